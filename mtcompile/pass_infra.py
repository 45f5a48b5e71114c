"""Pass infrastructure: the pass contract, the one registry, analyses, instruments, the runner.

A pass is a frozen dataclass whose fields are its options, with a kebab-case ``name``
and ``run(graph, ctx) -> PassResult``. It keeps no state between runs and returns a
valid graph. Instruments see every pass before and after it runs. Each option is declared
with `option` (type hint, default, bounds, choices, what it means: the pass's `schema`),
and every instance is checked against it here when it is made (`check_options`), before
any work: passes do not check their options themselves.

Analyses are values on ``Graph.analyses`` about that very graph (``"streams"``: a
`StreamAssignment` from assign-streams; ``"memory"``: a `MemoryPlan` from plan-memory,
which records the assignment it was made for). Each pass declares, as class attributes
(LLVM's ``PreservedAnalyses``, MLIR's analysis manager):

- ``requires``: analyses that must be present, computed on the graph the pass gets;
- ``computes``: analyses it attaches;
- ``preserves``: analyses still valid after it; ``None`` (the default) means all of them
  when it reports no change and none when it changed the graph.

`run_passes` drops every analysis a pass does not preserve (and keeps what it computes),
so no pass reads a result computed on an older graph. The runner never recomputes an
analysis on demand: both analyses have options the user chose (policy, streams, cores;
alignment, strategy), and recomputing with defaults would silently build something else
than asked. A pipeline that would need one is refused instead, naming the pass, the
analysis and the fix: a pass whose requirement no earlier pass computed, or a pass that
invalidates what an earlier pass computed when no later pass computes it again (e.g.
``plan-memory, assign-streams``: the plan was made for another stream order). `build_pipeline`
checks this before any work where the declarations decide it; the runner checks the rest
(a pass that changed the graph) when it happens.

A build runs the pipeline twice (see `mtcompile.api`): once for ``run_all``, and once,
without its ``run_all_only`` passes and with ``PassContext.entries``, for the tenants' own
entry functions.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

from mtcompile.errors import MTCompileError
from mtcompile.ir.graph import Graph


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the new graph, whether it differs, and facts for reports."""

    graph: Graph
    changed: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassContext:
    """What passes may know about the build: the target, the kernel provider per heavy
    op kind (``{"matmul": "native", ...}``; a library call is a kernel of its own), the
    machine's CPU cores (`mtcompile.api` reads them once per build; passes never ask the
    machine), and whether this run builds the tenants' own entries rather than ``run_all``."""

    target: str = "llvm"
    kernels: dict[str, str] = field(default_factory=dict)
    cores: int = 1
    entries: bool = False


@dataclass(frozen=True)
class Option:
    """What values a pass option takes beyond its type hint: bounds (inclusive), a set of
    choices, a power of two; `doc` says what it means. Declared with `option`."""

    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    power_of_two: bool = False
    doc: str = ""

    def problem(self, key: str, value: Any) -> str | None:
        """Why `value` is not a valid value of option `key`, or None (None values, the
        "not set" of optional options, always pass)."""
        if value is None:
            return None
        if isinstance(value, float) and value != value:
            return f"{key} must be a number, got {value}"
        if self.choices is not None and value not in self.choices:
            return f"unknown {key} {value!r}: {key} must be one of {list(self.choices)}"
        if self.power_of_two and (value <= 0 or value & (value - 1)):
            return f"{key} must be a power of two, got {value}"
        if self.minimum is not None and value < self.minimum:
            return f"{key} must be at least {self.minimum}, got {value}"
        if self.maximum is not None and value > self.maximum:
            return f"{key} must be at most {self.maximum}, got {value}"
        return None


def option(default: Any, *, minimum: float | None = None, maximum: float | None = None,
           choices: tuple | None = None, power_of_two: bool = False, doc: str = "") -> Any:
    """A pass option field: its default and the values it takes (`Option`)."""
    return field(default=default, metadata={"option": Option(
        minimum, maximum, tuple(choices) if choices is not None else None, power_of_two, doc)})


@dataclass(frozen=True)
class Pass:
    """Base class of passes; subclasses are frozen dataclasses whose fields are options,
    declared with `option` (type hint, default, allowed values). Every instance is checked
    against that schema when it is made, however it is made (`check_options`)."""

    name: ClassVar[str] = ""
    # True for passes whose result only ``run_all`` may use (e.g. batching several tenants
    # into one op): the run that builds the tenants' own entries leaves them out.
    run_all_only: ClassVar[bool] = False
    # analyses (names in ``Graph.analyses``) the pass needs, attaches, and keeps valid; see
    # the module docstring (None: all when the pass reports no change, none when it changed)
    requires: ClassVar[tuple[str, ...]] = ()
    computes: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[tuple[str, ...] | None] = None

    def __post_init__(self) -> None:
        check_options(self)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def schema(cls) -> list[dict[str, Any]]:
        """The pass's options: name, type, default and allowed values, in field order."""
        hints = _hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("option", Option())
            out.append({"name": f.name, "type": _hint_text(hints.get(f.name, Any)),
                        "default": f.default, **{k: v for k, v in dataclasses.asdict(spec).items()
                                                 if v not in (None, False, "")}})
        return out


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry under its kebab-case name."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"pass {cls.__name__} needs a unique name (got {cls.name!r})")
    REGISTRY[cls.name] = cls
    return cls


class PassError(MTCompileError):
    """A pass failed; names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        self.pass_name, self.before, self.cause = pass_name, before, cause
        ran = ", ".join(before) if before else "none"
        super().__init__(f"pass '{pass_name}' failed (passes run before it: {ran}): "
                         f"{type(cause).__name__}: {cause}")


class PassOptionError(MTCompileError, ValueError):
    """A pass option has the wrong type or value (raised before any work)."""


class AnalysisError(MTCompileError):
    """A pipeline would use an analysis no pass computed, or lose one a pass computed."""


def _fits(hint: Any, value: Any) -> bool:
    """Whether `value` matches the type hint of an option (hints this check does not
    know pass)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(args[0], v) for v in value)
        return len(args) == len(value) and all(_fits(a, v) for a, v in zip(args, value, strict=True))
    if hint in (int, float) and isinstance(value, bool):
        return False  # True is an int to Python, never a count or a rate to a pass
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint) if isinstance(hint, type) else True


def _hint_text(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation this module cannot resolve: only the schema checks
        return {}


def check_options(p: Pass) -> None:
    """Check every option of pass instance `p` against its declared type and `Option`
    (lists become tuples: TOML and JSON give lists, options are frozen); raises
    `PassOptionError` naming the pass, the option, what it takes and what it got."""
    hints = _hints(type(p))
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        hint = hints.get(f.name, Any)
        if not _fits(hint, value):
            raise PassOptionError(f"pass {p.name!r}: option {f.name!r} must be "
                                  f"{_hint_text(hint)}, got {value!r} ({type(value).__name__})")
        if isinstance(value, list):
            object.__setattr__(p, f.name, tuple(value))
        problem = f.metadata.get("option", Option()).problem(f.name, value)
        if problem:
            raise PassOptionError(f"pass {p.name!r}: {problem}")


def make_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    """An instance of the registered pass `name` with `options`, or a clear error
    (unknown pass or option, an option of the wrong type or value: `check_options`)."""
    if name not in REGISTRY:
        raise MTCompileError(f"unknown pass {name!r}; registered passes: {sorted(REGISTRY)}")
    if options is not None and not isinstance(options, dict):
        raise PassOptionError(f"options of pass {name!r} must be a dict of option -> value, "
                              f"got {options!r} ({type(options).__name__})")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = set(options or {}) - fields
    if bad:
        raise MTCompileError(f"pass {name!r} has no option(s) {sorted(bad)}; "
                             f"its options: {sorted(fields) or 'none'}")
    return cls(**(options or {}))


# --------------------------------------------------------------------------- analyses


def entry_pipeline(passes: list[Pass]) -> list[Pass]:
    """The passes of the run that builds the tenants' own entries: all but ``run_all_only``."""
    return [p for p in passes if not p.run_all_only]


def _computers(analysis: str) -> list[str]:
    return [n for n, cls in REGISTRY.items() if analysis in cls.computes]


def _missing(p: Pass, analysis: str, names: list[str]) -> str:
    fix = " or ".join(repr(n) for n in _computers(analysis)) or "a pass that computes it"
    return (f"pass '{p.name}' requires analysis '{analysis}', which no pass before it "
            f"computed on the graph it gets; run {fix} before '{p.name}' "
            f"(pipeline: {', '.join(names)})")


def _lost(analysis: str, by: str, p: Pass, why: str, later: list[Pass],
          names: list[str]) -> str | None:
    """The error for `p` dropping `analysis` that pass `by` computed, unless a later pass
    computes it again."""
    if any(analysis in q.computes for q in later):
        return None
    return (f"pass '{p.name}' invalidates analysis '{analysis}' computed by '{by}' before it "
            f"({why}), and no later pass computes it again: run '{by}' after '{p.name}' "
            f"(pipeline: {', '.join(names)})")


def check_pipeline(passes: list[Pass]) -> None:
    """Refuse, before any work, a pipeline whose declarations already show that a pass
    requires an analysis no earlier pass computed, or that an analysis a pass computed is
    invalidated by a later pass that declares it does not preserve it (the run_all run and
    the entries' run both). Passes that preserve by default are checked by `run_passes`."""
    for run in (passes, entry_pipeline(passes)):
        names = [p.name for p in run]
        have: dict[str, str] = {}  # analysis -> the pass that computed it
        for i, p in enumerate(run):
            for a in p.requires:
                if a not in have:
                    raise AnalysisError(_missing(p, a, names))
            if p.preserves is not None:
                for a, by in list(have.items()):
                    if a not in p.preserves and a not in p.computes:
                        lost = _lost(a, by, p, "it does not preserve it", run[i + 1:], names)
                        if lost:
                            raise AnalysisError(lost)
                        del have[a]
            have.update({a: p.name for a in p.computes})


def _keep_valid(p: Pass, before: Graph, result: PassResult) -> dict[str, Any]:
    """The analyses valid after `p`: those it preserves, and those it computed."""
    after = result.graph.analyses
    stray = sorted(a for a, v in after.items()
                   if a not in p.computes and before.analyses.get(a) is not v)
    if stray:
        raise AnalysisError(f"pass '{p.name}' attached analysis {stray} that it does not "
                            f"declare in `computes` ({list(p.computes)})")
    if p.preserves is None:
        keep = set(before.analyses) if not result.changed else set()
    else:
        keep = set(p.preserves)
    valid = {a: v for a, v in before.analyses.items() if a in keep}
    valid.update({a: v for a, v in after.items() if a in p.computes})
    return valid


# --------------------------------------------------------------------------- instruments


class Instrument:
    """Hooks around each pass; override what you need."""

    def before_pass(self, p: Pass, graph: Graph, index: int) -> None:
        pass

    def after_pass(self, p: Pass, result: PassResult, index: int, seconds: float) -> None:
        pass


@dataclass
class PassRecord:
    """One pass run: its name, time, whether it changed the graph, and its facts."""

    name: str
    seconds: float
    changed: bool
    nodes_after: int
    info: dict[str, Any]
    kernels_after: int | None = None  # kernels of run_all after the pass (for reports)
    weight_bytes_after: int | None = None


class Timing(Instrument):
    """Records the time and effect of every pass (the runner always uses one)."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []

    def after_pass(self, p, result, index, seconds):
        from mtcompile.analysis.schedule import kernel_dag

        g = result.graph
        try:
            kernels = len(kernel_dag(g).kernels)
        except Exception:  # a broken graph is the verifier's to report, not the timer's
            kernels = None
        self.records.append(PassRecord(p.name, seconds, result.changed, len(g.nodes),
                                       dict(result.info), kernels, g.weight_bytes()))


class PrintAfter(Instrument):
    """Prints the graph after the named passes (all passes when `names` is None)."""

    def __init__(self, names: list[str] | None = None, stream: TextIO | None = None):
        self.names, self.stream = names, stream

    def after_pass(self, p, result, index, seconds):
        if self.names is None or p.name in self.names:
            print(f"// after {p.name} ({'changed' if result.changed else 'unchanged'})",
                  file=self.stream or sys.stdout)
            print(result.graph, file=self.stream or sys.stdout)


class DumpToDir(Instrument):
    """Writes ``000_input.txt`` and ``NNN_<pass>.txt`` graph dumps into a directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def before_pass(self, p, graph, index):
        if index == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "000_input.txt").write_text(str(graph) + "\n")

    def after_pass(self, p, result, index, seconds):
        (self.dir / f"{index + 1:03d}_{p.name}.txt").write_text(str(result.graph) + "\n")


VERIFY_ENV = "MTCOMPILE_VERIFY"  # set (not "0"): every pipeline run verifies after each pass


class VerifyAfter(Instrument):
    """Runs the IR verifier after every pass."""

    def after_pass(self, p, result, index, seconds):
        result.graph.verify()


def run_passes(graph: Graph, passes: list[Pass], ctx: PassContext | None = None,
               instruments: list[Instrument] = ()) -> tuple[Graph, list[PassRecord]]:
    """Run `passes` in order; returns the final graph and one record per pass.

    After each pass only the analyses it preserves or computed stay on the graph; a pass
    whose required analysis is missing, or one that invalidates an analysis an earlier
    pass of this run computed (when no later pass computes it again), raises
    `AnalysisError` (see the module docstring)."""
    ctx = ctx or PassContext()
    timing = Timing()
    hooks = [*instruments, timing]
    if os.environ.get(VERIFY_ENV, "") not in ("", "0") and not any(
            isinstance(h, VerifyAfter) for h in instruments):
        hooks.insert(0, VerifyAfter())  # debug builds and CI: the verifier after every pass
    names = [p.name for p in passes]
    computed_by: dict[str, str] = {}  # analyses this run computed -> the pass that did
    done: list[str] = []
    for i, p in enumerate(passes):
        for a in p.requires:
            if a not in graph.analyses:
                raise AnalysisError(_missing(p, a, names))
        try:
            for h in hooks:
                h.before_pass(p, graph, i)
            t0 = time.perf_counter()
            result = p.run(graph, ctx)
            seconds = time.perf_counter() - t0
            valid = _keep_valid(p, graph, result)
            for a in graph.analyses.keys() - valid.keys():
                why = "it changed the graph" if result.changed else "it does not preserve it"
                lost = a in computed_by and _lost(a, computed_by[a], p, why, passes[i + 1:],
                                                  names)
                if lost:
                    raise AnalysisError(lost)
            if valid.keys() != result.graph.analyses.keys():
                result = dataclasses.replace(
                    result, graph=dataclasses.replace(result.graph, analyses=valid))
            for h in hooks:
                h.after_pass(p, result, i, seconds)
        except (PassError, AnalysisError):
            raise
        except Exception as e:
            raise PassError(p.name, done, e) from e
        computed_by.update({a: p.name for a in p.computes if a in valid})
        graph = result.graph
        done.append(p.name)
    return graph, timing.records
