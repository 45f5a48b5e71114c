"""A module of functions: one graph per function of the bundle (each tenant's entry,
``run_all``, a merged call over a subset of tenants) over constants shared by content key.

A function's graph holds the nodes its tenants' outputs need and names only its tenants:
passes transform each function on its own (`mtcompile.pass_infra`), lowering emits each
as one Relax function, and a constant several functions read is stored once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from mtcompile.ir.graph import INPUT, Graph, TenantIO


def restrict(graph: Graph, tenants: Iterable[str]) -> Graph:
    """The part of `graph` that computes `tenants`' outputs, naming those tenants only:
    their inputs and the nodes their outputs depend on (a node several tenants share keeps
    the present ones)."""
    keep = [t for t in graph.tenants if t in set(tenants)]
    live = graph.live_nodes(keep)
    inputs = {node for t in keep for _, node in graph.tenants[t].inputs}
    nodes = [
        replace(n, tenants=tuple(t for t in n.tenants if t in keep))
        for n in graph.nodes
        if n.name in live or (n.op == INPUT and n.name in inputs)
    ]
    return graph.with_nodes(
        nodes, {t: TenantIO(graph.tenants[t].inputs, graph.tenants[t].outputs) for t in keep}
    )


@dataclass(frozen=True)
class Module:
    """Functions by name, in emission order; each a `Graph` whose tenants are the tenants
    the function serves."""

    functions: Mapping[str, Graph]

    @classmethod
    def of(cls, merged: Graph, run_all: str, subsets: Mapping[str, Iterable[str]] = {}) -> Module:
        """Each tenant's entry (named after it), `run_all` over every tenant, and a function
        per `subsets` item (name -> tenants) over just those tenants."""
        functions = {t: restrict(merged, [t]) for t in merged.tenants}
        functions[run_all] = merged
        functions.update({name: restrict(merged, ts) for name, ts in subsets.items()})
        return cls(functions)

    def with_functions(self, changed: Mapping[str, Graph]) -> Module:
        """The same module with some functions replaced."""
        return Module({name: changed.get(name, g) for name, g in self.functions.items()})

    def constants(self) -> dict[str, np.ndarray]:
        """Every constant some function reads, once per content key."""
        return {k: v for g in self.functions.values() for k, v in g.constants.items()}

    def weight_bytes(self) -> int:
        """Bytes of all constants of the module, each stored once."""
        return int(sum(a.nbytes for a in self.constants().values()))

    def __str__(self) -> str:
        return "\n".join(
            f"func {name}({', '.join(g.tenants)}):\n" + str(g) for name, g in self.functions.items()
        )

    def verify(self) -> None:
        """Every function's graph verified (`Graph.verify`)."""
        for g in self.functions.values():
            g.verify()
