"""Analyses on demand: typed values about a function's graph, cached by (function, analysis
type) and dropped when the graph changes unless the pass that changed it preserves them
(MLIR's ``AnalysisManager``).

Two kinds of analysis:

- **derived** (`KernelDAG`, `Liveness`): a function of the graph alone. A provider table
  (type -> how to compute it) says how; `get` computes one lazily, once per function and
  graph. The kernel DAG is what TVM emits, which only the backend can say: the layer that
  builds the manager plugs it in (`mtcompile.api`: `mtcompile.backend.emitted.kernel_dag`);
  without it, asking for one raises `AnalysisError` saying so.
- **chosen** (`StreamAssignment`, `MemoryPlan`): made by a pass from options the user
  chose (policy, streams, cores; alignment, strategy). Recomputing one with defaults would
  silently build something else than asked, so only a pass stores one (`put`), and `get` of
  a missing one raises `AnalysisError` naming the pass that computes it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mtcompile.analysis.memory import Liveness
from mtcompile.analysis.schedule import KernelDAG
from mtcompile.errors import MTCompileError
from mtcompile.ir.graph import Graph

T = TypeVar("T")


class AnalysisError(MTCompileError):
    """A pipeline would use an analysis no pass computed, or lose one a pass computed."""


@dataclass(frozen=True)
class Derived:
    """A provider computed from other analyses of the same function: ``compute(*values of
    inputs)`` (a plain provider is ``compute(graph)``)."""

    compute: Callable[..., Any]
    inputs: tuple[type, ...]


Provider = Callable[[Graph], Any] | Derived


def _no_kernel_model(graph: Graph) -> KernelDAG:
    raise AnalysisError(
        "the kernel DAG is read off what TVM emits, and this analysis manager has no kernel "
        "model: plug one in (providers={KernelDAG: ...}, or PassContext(kernel_model=...); "
        "mtcompile.api uses mtcompile.backend.emitted.kernel_dag)"
    )


# the derived analyses and how to compute them by default
DEFAULT_PROVIDERS: Mapping[type, Provider] = {
    KernelDAG: _no_kernel_model,
    Liveness: Derived(Liveness.of, (KernelDAG,)),
}


def analysis_name(cls: type) -> str:
    """How errors and reports name an analysis type."""
    return cls.__name__


class AnalysisManager:
    """The analyses of a module's functions, keyed by (function name, analysis type).

    functions: function name -> its current graph (`update` rebinds one after a pass);
    providers: derived analysis type -> provider (`DEFAULT_PROVIDERS` and the given ones);
    computers: analysis type -> the names of the passes that compute it (for errors)."""

    def __init__(
        self,
        functions: Mapping[str, Graph] | None = None,
        providers: Mapping[type, Provider] | None = None,
        computers: Callable[[type], Sequence[str]] | None = None,
    ):
        self.providers: dict[type, Provider] = {**DEFAULT_PROVIDERS, **(providers or {})}
        self._computers = computers or (lambda cls: [])
        self._graphs: dict[str, Graph] = dict(functions or {})
        self._cache: dict[tuple[str, type], Any] = {}

    # -- the functions
    def graph(self, function: str) -> Graph:
        """The graph of `function` the cached analyses are about."""
        if function not in self._graphs:
            raise AnalysisError(
                f"no function {function!r} in the analysis manager; "
                f"functions: {sorted(self._graphs)}"
            )
        return self._graphs[function]

    def holds(self, function: str, graph: Graph) -> bool:
        """Whether `graph` is the graph of `function` the analyses are about."""
        return self._graphs.get(function) is graph

    def bind(self, functions: Mapping[str, Graph]) -> None:
        """Make `functions` the current graphs; a function whose graph differs from the one
        held loses its analyses (they were about another graph)."""
        for name, g in functions.items():
            if not self.holds(name, g):
                self.update(name, g, preserved=())

    def update(
        self, function: str, graph: Graph, preserved: Collection[type] | None = None
    ) -> list[type]:
        """`function`'s graph is now `graph`: keep the analyses in `preserved` (all when
        None), drop the others; returns the dropped types."""
        self._graphs[function] = graph
        dropped = [
            cls
            for (f, cls) in self._cache
            if f == function and preserved is not None and cls not in preserved
        ]
        for cls in dropped:
            del self._cache[function, cls]
        return dropped

    def plug(self, providers: Mapping[type, Provider]) -> None:
        """Use `providers` for the derived analyses this manager still computes by default
        (a kernel model given with the pass context, when the manager was made without)."""
        for cls, provider in providers.items():
            if self.providers.get(cls) is DEFAULT_PROVIDERS.get(cls):
                self.providers[cls] = provider

    # -- the analyses
    def derivable(self, cls: type) -> bool:
        """Whether `get` can compute `cls` from the graph (a provider is registered)."""
        return cls in self.providers

    def cached(self, function: str, cls: type[T]) -> T | None:
        """`function`'s analysis `cls` if it is cached, else None (never computes)."""
        return self._cache.get((function, cls))

    def get(self, function: str, cls: type[T]) -> T:
        """`function`'s analysis `cls`: cached, or computed now by its provider and cached;
        an analysis only a pass computes raises `AnalysisError` naming that pass."""
        key = (function, cls)
        if key in self._cache:
            return self._cache[key]
        graph = self.graph(function)
        provider = self.providers.get(cls)
        if provider is None:
            passes = " or ".join(repr(n) for n in self._computers(cls)) or "a pass that computes it"
            raise AnalysisError(
                f"analysis '{analysis_name(cls)}' of function '{function}' was not computed: "
                f"it has options only a pass knows; run {passes} first"
            )
        if isinstance(provider, Derived):
            value = provider.compute(*(self.get(function, c) for c in provider.inputs))
        else:
            value = provider(graph)
        self._cache[key] = value
        return value

    def put(self, function: str, value: Any) -> None:
        """Store `value` as `function`'s analysis of its type (what a pass computed)."""
        self.graph(function)
        self._cache[function, type(value)] = value

    def all_cached(self, function: str) -> dict[type, Any]:
        """`function`'s cached analyses by type."""
        return {cls: v for (f, cls), v in self._cache.items() if f == function}
