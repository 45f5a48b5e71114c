"""fuse-vertical: each anchor (TVM matmul/conv, reduction, or any op starting a chain) plus
the elementwise/injective ops that follow it alone -> one fusion group = one kernel.

A decision on our graph, made as TVM's FuseOps would make it, so that later passes see
the kernels that really run: lowering emits every group as one primitive function, which
TVM turns into exactly one kernel. Library calls (PyTorch matmul/conv) are kernels of
their own and never join a group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mtcompile.ir import GET_ITEM, INPUT, TUPLE, ConstRef, Graph, Node, TensorTy
from mtcompile.pass_infra import Pass, PassContext, PassResult, register

ELEMWISE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power",
            "relax.maximum", "relax.minimum", "relax.less", "relax.greater", "relax.equal",
            "relax.where", "relax.nn.relu", "relax.nn.gelu", "relax.nn.silu", "relax.tanh",
            "relax.exp", "relax.erf", "relax.sigmoid", "relax.sqrt", "relax.rsqrt",
            "relax.negative", "relax.astype", "relax.abs", "relax.log", "relax.clip"}
INJECTIVE = {"relax.reshape", "relax.permute_dims", "relax.broadcast_to", "relax.expand_dims",
             "relax.squeeze", "relax.strided_slice", "relax.concat", "relax.stack",
             "relax.take"}
REDUCTION = {"relax.sum", "relax.mean", "relax.max", "relax.min", "relax.nn.softmax",
             "relax.nn.layer_norm", "relax.nn.batch_norm"}
HEAVY = {"relax.matmul": "matmul", "relax.nn.conv2d": "conv2d"}


def _kind(n: Node, kernels: dict[str, str]) -> str | None:
    """'library', 'anchor', 'reduce', 'elemwise' (elementwise or injective), or None."""
    if n.op in HEAVY:
        return "library" if kernels.get(HEAVY[n.op]) == "library" else "anchor"
    if not isinstance(n.ty, TensorTy) or n.op in (TUPLE, GET_ITEM):
        return None  # tuples and their items stay out of groups
    if n.op in REDUCTION:
        return "reduce"
    if n.op in ELEMWISE or n.op in INJECTIVE:
        return "elemwise"
    return "anchor"  # any other op: a kernel of its own that may take followers


def _left_to_tvm(graph: Graph, kinds: dict, users: dict) -> set[str]:
    """Nodes that must stay outside groups so TVM's preparation can remove them:
    values computed from constants alone (folded at compile time), a batch-norm right
    after a convolution (folded into its weights) and a constant bias added right after
    a library call (joins the call as addmm / conv bias)."""
    const: set[str] = set()
    for n in graph.nodes:
        if n.op != INPUT and all(i in const for i in n.inputs):
            const.add(n.name)
    out = set(const)
    for n in graph.nodes:
        srcs = n.inputs
        if not srcs or srcs[0] not in graph or users[srcs[0]] != [n.name]:
            continue
        src = graph.node(srcs[0])
        if n.op == "relax.nn.batch_norm" and src.op == "relax.nn.conv2d":
            out.add(n.name)
            out.update(u for u in users[n.name] if graph.node(u).op == GET_ITEM)
        elif n.op == "relax.add" and kinds.get(src.name) == "library" and any(
                _is_bias(graph, a, src) for a in n.args):
            out.add(n.name)
    return out


def _is_bias(graph: Graph, arg, producer: Node) -> bool:
    """A constant holding one value per output channel of a matmul (last axis) or a
    convolution (axis 1): the offload folds it into the library call."""
    if not isinstance(arg, ConstRef) or not isinstance(producer.ty, TensorTy):
        return False
    arr, shape = graph.constants[arg.key], producer.ty.shape
    axis = 1 if producer.op == "relax.nn.conv2d" else len(shape) - 1
    channels = shape[axis] if shape else 0
    padded = (1,) * (len(shape) - arr.ndim) + tuple(arr.shape)
    return arr.size == channels and len(padded) == len(shape) and padded[axis] == channels


@register
@dataclass(frozen=True)
class FuseVertical(Pass):
    """Grows chains from producer to sole consumer: an anchor or a reduction takes the
    elementwise/injective ops after it, and an elementwise chain may take one reduction
    (TVM's injective -> reduction fusion); a group holds at most one anchor or reduction.
    Every group is a chain, so it has one value used outside it (its last node)."""

    name = "fuse-vertical"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        users = graph.users()
        for o in graph.output_names():
            users[o].append("<output>")
        kinds = {n.name: _kind(n, ctx.kernels) for n in graph.nodes}
        for name in _left_to_tvm(graph, kinds, users):
            kinds[name] = None
        group_of: dict[str, str] = {}
        heavy_in: dict[str, bool] = {}  # group -> it already holds an anchor or a reduction
        for n in graph.nodes:
            kind = kinds[n.name]
            if n.op == INPUT or kind in (None, "library"):
                continue
            target = None
            for src in n.inputs:
                g = group_of.get(src)
                if g is None or users[src] != [n.name]:
                    continue
                if kind == "elemwise" or (kind == "reduce" and not heavy_in[g]):
                    target = g
                    break
            if target is None:
                target = f"g{len(heavy_in)}"
                heavy_in[target] = False
            group_of[n.name] = target
            heavy_in[target] |= kind in ("anchor", "reduce")
        if not group_of:
            return PassResult(graph, False)
        nodes = [replace(n, group=group_of.get(n.name)) for n in graph.nodes]
        sizes: dict[str, int] = {}
        for g in group_of.values():
            sizes[g] = sizes.get(g, 0) + 1
        library = sum(1 for k in kinds.values() if k == "library")
        return PassResult(graph.with_nodes(nodes), True,
                          {"groups": len(sizes), "grouped_nodes": len(group_of),
                           "library_calls": library, "kernels": len(sizes) + library})
