"""Pass infrastructure: the pass contract, the one registry, analyses, instruments, the runner.

A pass is a frozen dataclass whose fields are its options, with a kebab-case ``name``
and ``run(graph, ctx) -> PassResult``. It keeps no state between runs and returns a
valid graph. Instruments see every pass before and after it runs. Each option is declared
with `option` (type hint, default, bounds, choices, what it means: the pass's `schema`),
and every instance is checked against it here when it is made (`check_options`), before
any work: passes do not check their options themselves.

Analyses are typed values about one function's graph, held by an `AnalysisManager`
(`mtcompile.analysis.manager`) keyed by (function, analysis type), MLIR's model: derived
ones (`KernelDAG`, `Liveness`) are computed on demand from the graph by the manager's
providers and cached; chosen ones (`StreamAssignment` from assign-streams, `MemoryPlan`
from plan-memory, which records the assignment it was made for) have options the user
chose and are only ever computed by their pass. A pass reads them through its context
(``ctx.analysis(graph, KernelDAG)``, ``ctx.cached(graph, StreamAssignment)``) and returns
what it computed in ``PassResult.analyses``. Each pass declares analysis types, as class
attributes (LLVM's ``PreservedAnalyses``):

- ``requires``: analyses that must be there for the graph the pass gets (a derived one
  always is: the manager computes it);
- ``computes``: analyses it returns;
- ``preserves``: analyses still valid after it; ``None`` (the default) means all of them
  when it reports no change and none when it changed the graph.

After each pass, `run_passes` drops every cached analysis of each function the pass ran on
that it does not preserve, and stores what it computed, so no pass reads a result computed
on an older graph; a dropped derived analysis is simply computed again when next asked
for. The runner never recomputes a chosen analysis (recomputing with defaults would
silently build something else than asked): a pipeline that would need one is refused
instead, naming the pass, the analysis and the fix: a pass whose requirement no earlier
pass computed, or a pass that invalidates what an earlier pass computed when no later pass
computes it again (e.g. ``plan-memory, assign-streams``: the plan was made for another
stream order). `build_pipeline` checks this before any work where the declarations decide
it; the runner checks the rest (a pass that changed the graph) when it happens.

A build runs the pipeline once over a `Module` of functions (each tenant's entry,
``run_all``, the requested subsets). Each pass declares its ``scope``: the functions it
transforms (every function; those over several tenants, where batching tenants pays; or
``run_all`` alone), and runs once over the module, on each function of its scope (with
``PassContext.function`` naming it). The manager given to `run_passes` (or made by
`analysis_manager`) holds every function's analyses afterwards: lowering, the manifest
and reports read them from it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO, TypeVar

from mtcompile.abi import RUN_ALL
from mtcompile.analysis.manager import (
    DEFAULT_PROVIDERS,
    AnalysisError,
    AnalysisManager,
    Provider,
    analysis_name,
)
from mtcompile.analysis.schedule import KernelDAG
from mtcompile.errors import MTCompileError
from mtcompile.ir.graph import Graph
from mtcompile.ir.module import Module

T = TypeVar("T")


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the new graph, whether it differs, and facts for reports (what
    instruments get: the module, or the graph `run_passes` was given)."""

    graph: Graph | Module
    changed: bool
    info: dict[str, Any] = field(default_factory=dict)
    # the analyses the pass computed for the graph it returns (types in its `computes`)
    analyses: tuple[Any, ...] = ()

    def analysis(self, cls: type[T]) -> T | None:
        """The analysis of type `cls` the pass computed, or None."""
        return next((a for a in self.analyses if type(a) is cls), None)


@dataclass(frozen=True)
class PassContext:
    """What passes may know about the build: the target, the kernel provider per heavy
    op kind (``{"matmul": "native", ...}``; a library call is a kernel of its own), the
    machine's CPU cores (`mtcompile.api` reads them once per build; passes never ask the
    machine), the function of the module the pass is transforming, the build's
    `AnalysisManager` (set by `run_passes`), and the kernel model: (graph, tenants) -> the
    kernels that run, the `KernelDAG` provider of the managers it makes (`mtcompile.api`
    gives the kernels TVM emits, `mtcompile.backend.emitted.kernel_dag`; passes may not
    import the backend)."""

    target: str = "llvm"
    kernels: dict[str, str] = field(default_factory=dict)
    cores: int = 1
    function: str = RUN_ALL
    analyses: AnalysisManager | None = field(default=None, compare=False, repr=False)
    kernel_model: Callable[[Graph, list[str] | None], KernelDAG] | None = field(
        default=None, compare=False, repr=False
    )

    def providers(self) -> dict[type, Provider] | None:
        """The derived-analysis providers this context brings: its kernel model, if any."""
        model = self.kernel_model
        return None if model is None else {KernelDAG: lambda graph: model(graph, None)}

    def _manager(self, graph: Graph) -> AnalysisManager:
        """The build's manager when it holds `graph` as this function's graph; else (a pass
        run on its own) a manager of this graph alone, with the same providers, kept for
        this context's later questions."""
        am = self.analyses
        if am is not None and am.holds(self.function, graph):
            return am
        own = self.__dict__.get("_own")
        if own is None or not own.holds(self.function, graph):
            own = analysis_manager({self.function: graph}, am.providers if am else self.providers())
            object.__setattr__(self, "_own", own)  # a cache, not a field (frozen)
        return own

    def analysis(self, graph: Graph, cls: type[T]) -> T:
        """The analysis `cls` of `graph`, the graph of the function being transformed
        (`AnalysisManager.get`: computed on demand when derived)."""
        return self._manager(graph).get(self.function, cls)

    def cached(self, graph: Graph, cls: type[T]) -> T | None:
        """The analysis `cls` of `graph` if one is there, else None (never computes)."""
        return self._manager(graph).cached(self.function, cls)


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


def option(
    default: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple | None = None,
    power_of_two: bool = False,
    doc: str = "",
) -> Any:
    """A pass option field: its default and the values it takes (`Option`)."""
    return field(
        default=default,
        metadata={
            "option": Option(
                minimum, maximum, tuple(choices) if choices is not None else None, power_of_two, doc
            )
        },
    )


@dataclass(frozen=True)
class Pass:
    """Base class of passes; subclasses are frozen dataclasses whose fields are options,
    declared with `option` (type hint, default, allowed values). Every instance is checked
    against that schema when it is made, however it is made (`check_options`)."""

    name: ClassVar[str] = ""
    # the functions of the module the pass transforms (`SCOPES`): every function, those
    # over several tenants (e.g. batching tenants into one op), or run_all alone
    scope: ClassVar[str] = "function"
    # analysis types the pass needs, computes, and keeps valid; see the module docstring
    # (None: all when the pass reports no change, none when it changed)
    requires: ClassVar[tuple[type, ...]] = ()
    computes: ClassVar[tuple[type, ...]] = ()
    preserves: ClassVar[tuple[type, ...] | None] = None

    def __post_init__(self) -> None:
        check_options(self)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def applies_to(self, function: str, graph: Graph) -> bool:
        """Whether the pass transforms `function` (its graph `graph`): its `scope`."""
        return SCOPES[self.scope](function, graph)

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def schema(cls) -> list[dict[str, Any]]:
        """The pass's options: name, type, default and allowed values, in field order."""
        hints = _hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("option", Option())
            out.append(
                {
                    "name": f.name,
                    "type": _hint_text(hints.get(f.name, Any)),
                    "default": f.default,
                    **{
                        k: v
                        for k, v in dataclasses.asdict(spec).items()
                        if v not in (None, False, "")
                    },
                }
            )
        return out


# scope -> whether a function (name, graph) is in it
SCOPES = {
    "function": lambda name, graph: True,
    "multi-tenant": lambda name, graph: len(graph.tenants) > 1,
    "run-all": lambda name, graph: name == RUN_ALL,
}

REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry under its kebab-case name."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"pass {cls.__name__} needs a unique name (got {cls.name!r})")
    if cls.scope not in SCOPES:
        raise ValueError(f"pass {cls.name}: unknown scope {cls.scope!r}; one of {list(SCOPES)}")
    REGISTRY[cls.name] = cls
    return cls


class PassError(MTCompileError):
    """A pass failed; names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        self.pass_name, self.before, self.cause = pass_name, before, cause
        ran = ", ".join(before) if before else "none"
        super().__init__(
            f"pass '{pass_name}' failed (passes run before it: {ran}): "
            f"{type(cause).__name__}: {cause}"
        )


class PassOptionError(MTCompileError, ValueError):
    """A pass option has the wrong type or value (raised before any work)."""


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
        return len(args) == len(value) and all(
            _fits(a, v) for a, v in zip(args, value, strict=True)
        )
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
            raise PassOptionError(
                f"pass {p.name!r}: option {f.name!r} must be "
                f"{_hint_text(hint)}, got {value!r} ({type(value).__name__})"
            )
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
        raise PassOptionError(
            f"options of pass {name!r} must be a dict of option -> value, "
            f"got {options!r} ({type(options).__name__})"
        )
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = set(options or {}) - fields
    if bad:
        raise MTCompileError(
            f"pass {name!r} has no option(s) {sorted(bad)}; its options: {sorted(fields) or 'none'}"
        )
    return cls(**(options or {}))


# --------------------------------------------------------------------------- analyses


def _computers(analysis: type) -> list[str]:
    return [n for n, cls in REGISTRY.items() if analysis in cls.computes]


def analysis_manager(
    functions: Mapping[str, Graph] | None = None, providers: Mapping[type, Provider] | None = None
) -> AnalysisManager:
    """An `AnalysisManager` over `functions` whose errors name the registered passes that
    compute a missing analysis; `providers` replace the default derived-analysis providers
    (e.g. another kernel model as the `KernelDAG` provider)."""
    return AnalysisManager(functions, providers, _computers)


def _missing(p: Pass, analysis: type, names: list[str]) -> str:
    fix = " or ".join(repr(n) for n in _computers(analysis)) or "a pass that computes it"
    return (
        f"pass '{p.name}' requires analysis '{analysis_name(analysis)}', which no pass before "
        f"it computed on the graph it gets; run {fix} before '{p.name}' "
        f"(pipeline: {', '.join(names)})"
    )


def _lost(
    analysis: type, by: str, p: Pass, why: str, later: list[Pass], names: list[str]
) -> str | None:
    """The error for `p` dropping `analysis` that pass `by` computed, unless a later pass
    computes it again."""
    if any(analysis in q.computes for q in later):
        return None
    return (
        f"pass '{p.name}' invalidates analysis '{analysis_name(analysis)}' computed by '{by}' "
        f"before it ({why}), and no later pass computes it again: run '{by}' after '{p.name}' "
        f"(pipeline: {', '.join(names)})"
    )


def _covers(computed: str, needed: str) -> bool:
    """Whether an analysis computed by a pass of scope `computed` is there for every
    function a pass of scope `needed` transforms."""
    return computed == "function" or computed == needed


def check_pipeline(passes: list[Pass]) -> None:
    """Refuse, before any work, a pipeline whose declarations already show that a pass
    requires an analysis no earlier pass computed on every function of its scope (derived
    analyses are always there: they are computed on demand), or that an analysis a pass
    computed is invalidated by a later pass that declares it does not preserve it (every
    two scopes share run_all). Passes that preserve by default are checked by
    `run_passes`."""
    names = [p.name for p in passes]
    have: dict[type, Pass] = {}  # analysis -> the pass that computed it
    for i, p in enumerate(passes):
        for a in p.requires:
            if a in DEFAULT_PROVIDERS:
                continue
            if a not in have or not _covers(have[a].scope, p.scope):
                raise AnalysisError(_missing(p, a, names))
        if p.preserves is not None:
            for a, by in list(have.items()):
                if a not in p.preserves and a not in p.computes:
                    lost = _lost(a, by.name, p, "it does not preserve it", passes[i + 1 :], names)
                    if lost:
                        raise AnalysisError(lost)
                    del have[a]
        have.update({a: p for a in p.computes})


def _computed(p: Pass, result: PassResult) -> list[Any]:
    """The analyses `p` returned, each of a type it declares in `computes`."""
    stray = sorted(analysis_name(type(a)) for a in result.analyses if type(a) not in p.computes)
    if stray:
        raise AnalysisError(
            f"pass '{p.name}' returned analysis {stray} that it does not declare in "
            f"`computes` ({[analysis_name(c) for c in p.computes]})"
        )
    return list(result.analyses)


def _preserved(p: Pass, changed: bool) -> tuple[type, ...] | None:
    """What stays valid after `p` (None: everything)."""
    if p.preserves is None:
        return None if not changed else ()
    return p.preserves


# --------------------------------------------------------------------------- instruments


class Instrument:
    """Hooks around each pass; override what you need."""

    def before_pass(self, p: Pass, graph: Graph | Module, index: int) -> None:
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


def main_function(ir: Graph | Module) -> str:
    """The function reports count: a graph's (``run_all``), a module's ``run_all`` (or its
    first function)."""
    if isinstance(ir, Graph) or RUN_ALL in ir.functions:
        return RUN_ALL
    return next(iter(ir.functions))


def main_graph(ir: Graph | Module) -> Graph:
    """The graph reports count: a graph itself, a module's ``run_all``."""
    return ir if isinstance(ir, Graph) else ir.functions[main_function(ir)]


class Timing(Instrument):
    """Records the time and effect of every pass (the runner always uses one). Kernels are
    counted after the last pass only (`count_kernels`), from the manager: the kernel model
    emits the function through TVM's fusion (seconds on an unfused graph), and the plans
    already asked it for the final graph."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []

    def after_pass(self, p, result, index, seconds):
        g = main_graph(result.graph)
        self.records.append(
            PassRecord(
                p.name,
                seconds,
                result.changed,
                len(g.nodes),
                dict(result.info),
                None,
                g.weight_bytes(),
            )
        )

    def count_kernels(self, ir: Graph | Module, analyses: AnalysisManager) -> None:
        """The last record's kernels of `ir`'s main function (left None when the manager
        has no kernel model or the graph is broken: the verifier reports that)."""
        if not self.records:
            return
        ctx = PassContext(function=main_function(ir), analyses=analyses)
        try:
            kernels = len(ctx.analysis(main_graph(ir), KernelDAG).kernels)
        except Exception:
            return
        self.records[-1] = dataclasses.replace(self.records[-1], kernels_after=kernels)


class PrintAfter(Instrument):
    """Prints the graph after the named passes (all passes when `names` is None)."""

    def __init__(self, names: list[str] | None = None, stream: TextIO | None = None):
        self.names, self.stream = names, stream

    def after_pass(self, p, result, index, seconds):
        if self.names is None or p.name in self.names:
            print(
                f"// after {p.name} ({'changed' if result.changed else 'unchanged'})",
                file=self.stream or sys.stdout,
            )
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


def _hooks(instruments, timing: Timing) -> list[Instrument]:
    """The user's instruments and the timer, after the verifier in debug builds and CI."""
    hooks = [*instruments, timing]
    if os.environ.get(VERIFY_ENV, "") not in ("", "0") and not any(
        isinstance(h, VerifyAfter) for h in instruments
    ):
        hooks.insert(0, VerifyAfter())  # the verifier after every pass
    return hooks


def run_passes(
    ir: Graph | Module,
    passes: list[Pass],
    ctx: PassContext | None = None,
    instruments: list[Instrument] = (),
    analyses: AnalysisManager | None = None,
) -> tuple[Graph | Module, list[PassRecord]]:
    """Run `passes` in order, each once, over a module (each on the functions of its
    scope) or over one graph (``run_all``'s); returns the result and one record per pass.

    `analyses` (a fresh `analysis_manager` when None) holds each function's analyses
    before and after: a function whose graph is not the one it holds loses its analyses
    first. After each pass only the analyses it preserves or computed stay cached for a
    function; a pass whose required analysis is missing, or one that invalidates an
    analysis an earlier pass computed (when no later pass computes it again), raises
    `AnalysisError` (see the module docstring)."""
    ctx = ctx or PassContext()
    am = analyses if analyses is not None else analysis_manager()
    am.plug(ctx.providers() or {})  # the context's kernel model, where the manager has none
    ctx = dataclasses.replace(ctx, analyses=am)
    timing = Timing()
    hooks = _hooks(instruments, timing)
    one = isinstance(ir, Graph)
    module = Module({RUN_ALL: ir}) if one else ir
    am.bind(module.functions)
    shown = (lambda m: m.functions[RUN_ALL]) if one else (lambda m: m)
    computed_by: dict[tuple[str, type], str] = {}  # (function, analysis) -> pass
    done: list[str] = []
    for i, p in enumerate(passes):
        try:
            for h in hooks:
                h.before_pass(p, shown(module), i)
            t0 = time.perf_counter()
            module, changed, info = _run_one(
                p, module, ctx, passes[i + 1 :], computed_by, [q.name for q in passes]
            )
            seconds = time.perf_counter() - t0
            result = PassResult(shown(module), changed, info)
            for h in hooks:
                h.after_pass(p, result, i, seconds)
        except (PassError, AnalysisError):
            raise
        except Exception as e:
            raise PassError(p.name, done, e) from e
        done.append(p.name)
    timing.count_kernels(shown(module), am)
    return shown(module), timing.records


def _run_one(
    p: Pass,
    module: Module,
    ctx: PassContext,
    later: list[Pass],
    computed_by: dict,
    names: list[str],
) -> tuple[Module, bool, dict]:
    """Pass `p` on each function of its scope: (the module, whether some function
    changed, its facts: one function's as they are, several by function)."""
    am = ctx.analyses
    changed, infos, out = False, {}, {}
    for fname, graph in module.functions.items():
        if not p.applies_to(fname, graph):
            continue
        for a in p.requires:
            if am.cached(fname, a) is None and not am.derivable(a):
                raise AnalysisError(_missing(p, a, names))
        result = p.run(graph, dataclasses.replace(ctx, function=fname))
        computed = _computed(p, result)
        dropped = am.update(fname, result.graph, _preserved(p, result.changed))
        for a in set(dropped) - set(p.computes):
            why = "it changed the graph" if result.changed else "it does not preserve it"
            lost = (fname, a) in computed_by and _lost(
                a, computed_by[fname, a], p, why, later, names
            )
            if lost:
                raise AnalysisError(lost)
            computed_by.pop((fname, a), None)
        for value in computed:
            am.put(fname, value)
            computed_by[fname, type(value)] = p.name
        out[fname] = result.graph
        changed |= result.changed
        if result.info:
            infos[fname] = dict(result.info)
    info = next(iter(infos.values())) if len(infos) == 1 and len(out) == 1 else infos
    return module.with_functions(out), changed, info
