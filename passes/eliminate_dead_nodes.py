"""eliminate-dead-nodes: drop every node no tenant output depends on (inputs are kept)."""

from __future__ import annotations

from dataclasses import dataclass

from mtcompile.ir.graph import INPUT, Graph
from mtcompile.pass_infra import Pass, PassContext, PassResult, register


@register
@dataclass(frozen=True)
class EliminateDeadNodes(Pass):
    """Removes nodes that are not reachable backwards from any tenant's outputs.

    Input nodes stay even when unused: they are part of the tenant's signature.
    """

    name = "eliminate-dead-nodes"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        live = graph.live_nodes()
        kept = [n for n in graph.nodes if n.name in live or n.op == INPUT]
        removed = len(graph.nodes) - len(kept)
        if not removed:
            return PassResult(graph, False)
        return PassResult(graph.with_nodes(kept), True, {"removed_nodes": removed})
