"""dedup: nodes with equal op, attrs, type and inputs (constants by content) -> one node
serving every tenant that computed it (cross-tenant common subexpressions)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mtcompile.ir.graph import INPUT, Graph, Node, Ref, TenantIO, map_refs
from mtcompile.pass_infra import Pass, PassContext, PassResult, register


@register
@dataclass(frozen=True)
class Dedup(Pass):
    """Hash-conses the graph in topological order.

    Inputs are never merged here: tenants share an input only when they declare it
    (``Tenant.shared_inputs``). With a shared input and equal weights, a shared backbone
    becomes one chain of nodes serving every tenant, so it runs once in ``run_all``.
    """

    name = "dedup"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        canon: dict[str, str] = {}  # node name -> the node that now computes it
        kept: dict[str, Node] = {}  # name -> node, in order
        by_key: dict[tuple, str] = {}
        for n in graph.nodes:
            n = replace(n, args=map_refs(n.args, lambda r: Ref(canon.get(r.name, r.name))))
            key = None if n.op == INPUT else (n.op, n.args, n.attrs, n.ty_args, n.ty)
            if key is not None and key in by_key:
                first = kept[by_key[key]]
                tenants = tuple(t for t in graph.tenants if t in first.tenants or t in n.tenants)
                kept[first.name] = replace(first, tenants=tenants)
                canon[n.name] = first.name
                continue
            if key is not None:
                by_key[key] = n.name
            kept[n.name] = n
        if not canon:
            return PassResult(graph, False)
        tenants = {
            t: TenantIO(
                io.inputs,
                tuple(
                    Ref(canon.get(o.name, o.name)) if isinstance(o, Ref) else o for o in io.outputs
                ),
            )
            for t, io in graph.tenants.items()
        }
        shared = sum(1 for n in kept.values() if len(n.tenants) > 1 and n.op != INPUT)
        return PassResult(
            graph.with_nodes(kept.values(), tenants),
            True,
            {"removed_nodes": len(canon), "shared_nodes": shared},
        )
