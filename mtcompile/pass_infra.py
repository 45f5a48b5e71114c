"""Pass infrastructure: the pass contract, the one registry, instruments and the runner.

A pass is a frozen dataclass whose fields are its options, with a kebab-case ``name``
and ``run(graph, ctx) -> PassResult``. It keeps no state between runs and returns a
valid graph. Instruments see every pass before and after it runs.
"""

from __future__ import annotations

import dataclasses
import sys
import time
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
    """What passes may know about the build: the target and the kernel provider per heavy
    op kind (``{"matmul": "library", ...}``; a library call is a kernel of its own)."""

    target: str = "llvm"
    kernels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base class of passes; subclasses are frozen dataclasses whose fields are options."""

    name: ClassVar[str] = ""
    # True for passes whose result only ``run_all`` may use (e.g. batching several tenants
    # into one op): each tenant's own entry is built from the graph before the first such pass.
    run_all_only: ClassVar[bool] = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def make_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    """An instance of the registered pass `name` with `options`, or a clear error."""
    if name not in REGISTRY:
        raise MTCompileError(f"unknown pass {name!r}; registered passes: {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = set(options or {}) - fields
    if bad:
        raise MTCompileError(f"pass {name!r} has no option(s) {sorted(bad)}; "
                             f"its options: {sorted(fields) or 'none'}")
    return cls(**(options or {}))


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

    def __init__(self, kernels: dict[str, str] | None = None) -> None:
        self.records: list[PassRecord] = []
        self.kernels = kernels or {}  # heavy-op providers: a library call is a kernel

    def after_pass(self, p, result, index, seconds):
        from mtcompile.analysis.schedule import kernel_dag

        g = result.graph
        try:
            kernels = len(kernel_dag(g, self.kernels).kernels)
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


class EntryGraph(Instrument):
    """The graph the tenants' own entries are built from: the pipeline without its
    ``run_all_only`` passes. Passes after the first such pass run a second time, on the
    graph as it was before it (so entries get fusion groups and memory plans too)."""

    def __init__(self, ctx: PassContext | None = None) -> None:
        self.ctx = ctx or PassContext()
        self.graph: Graph | None = None

    def before_pass(self, p, graph, index):
        if p.run_all_only and self.graph is None:
            self.graph = graph

    def after_pass(self, p, result, index, seconds):
        if self.graph is not None and not p.run_all_only:
            self.graph = p.run(self.graph, self.ctx).graph


class VerifyAfter(Instrument):
    """Runs the IR verifier after every pass."""

    def after_pass(self, p, result, index, seconds):
        result.graph.verify()


def run_passes(graph: Graph, passes: list[Pass], ctx: PassContext | None = None,
               instruments: list[Instrument] = ()) -> tuple[Graph, list[PassRecord]]:
    """Run `passes` in order; returns the final graph and one record per pass."""
    ctx = ctx or PassContext()
    timing = Timing(ctx.kernels)
    hooks = [*instruments, timing]
    done: list[str] = []
    for i, p in enumerate(passes):
        try:
            for h in hooks:
                h.before_pass(p, graph, i)
            t0 = time.perf_counter()
            result = p.run(graph, ctx)
            seconds = time.perf_counter() - t0
            for h in hooks:
                h.after_pass(p, result, i, seconds)
        except PassError:
            raise
        except Exception as e:
            raise PassError(p.name, done, e) from e
        graph = result.graph
        done.append(p.name)
    return graph, timing.records
