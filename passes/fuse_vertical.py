"""fuse-vertical: each anchor (TVM matmul/conv, reduction, or any op starting a chain) plus
the elementwise/injective ops that follow it alone -> one fusion group = one kernel; an
opaque op (`mtcompile.ir.ops.OPAQUE`) -> a group of its own.

A decision on our graph, made as TVM's FuseOps would make it, so that later passes see
the kernels that really run: lowering emits every group as one primitive function, which
TVM turns into exactly one kernel. Library call nodes (made by offload-library) are
kernels of their own and never join a group; op kinds come from `mtcompile.ir.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mtcompile.analysis.schedule import constant_only, op_kind
from mtcompile.ir.graph import INPUT, Graph
from mtcompile.pass_infra import Pass, PassContext, PassResult, register


@register
@dataclass(frozen=True)
class FuseVertical(Pass):
    """Grows chains from producer to sole consumer: an anchor or a reduction takes the
    elementwise/injective ops after it, and an elementwise chain may take one reduction
    (TVM's injective -> reduction fusion); a group holds at most one anchor or reduction.
    An opaque op (an extern kernel: sort, scan) is a group of its own that takes no
    followers, as in TVM's FuseOps (FuseTIR cannot fuse an extern kernel with anything).
    Every group is a chain, so it has one value used outside it (its last node)."""

    name = "fuse-vertical"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        users = graph.users()
        for o in graph.output_names():
            users[o].append("<output>")
        kinds = {n.name: op_kind(n) for n in graph.nodes}
        for name in constant_only(graph):  # left out of groups: TVM folds them away
            kinds[name] = None
        group_of: dict[str, str] = {}
        heavy_in: dict[str, bool] = {}  # group -> it already holds an anchor or a reduction
        closed: set[str] = set()  # groups of an opaque op: nothing joins them
        for n in graph.nodes:
            kind = kinds[n.name]
            if n.op == INPUT or kind in (None, "library"):
                continue
            target = None
            for src in n.inputs:
                g = group_of.get(src)
                if g is None or g in closed or users[src] != [n.name]:
                    continue
                if kind == "elemwise" or (kind == "reduce" and not heavy_in[g]):
                    target = g
                    break
            if target is None:
                target = f"g{len(heavy_in)}"
                heavy_in[target] = False
            group_of[n.name] = target
            heavy_in[target] |= kind in ("anchor", "reduce")
            if kind == "opaque":
                closed.add(target)
        if not group_of:
            return PassResult(graph, False)
        nodes = [replace(n, group=group_of.get(n.name)) for n in graph.nodes]
        sizes: dict[str, int] = {}
        for g in group_of.values():
            sizes[g] = sizes.get(g, 0) + 1
        library = sum(1 for k in kinds.values() if k == "library")
        return PassResult(
            graph.with_nodes(nodes),
            True,
            {
                "groups": len(sizes),
                "grouped_nodes": len(group_of),
                "library_calls": library,
                "kernels": len(sizes) + library,
            },
        )
