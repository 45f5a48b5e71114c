"""fold-batch-norm: batch_norm(conv2d(x, W), g, b, mean, var)[0] (inference, NCHW/OIHW,
constant weights) -> add(conv2d(x, W * s), b - mean * s), s = g / sqrt(var + eps).

The fold is computed with numpy on the constants, in TVM's order of operations (its
``FoldBatchnormToConv2D`` did this on the Relax before; on our graph the decision is
visible to offload-library, which then folds the add into a library conv as its bias, and
to the kernel model). A conv read elsewhere too keeps its batch-norm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from tvm import relax

from mtcompile.ir.builder import graph_types, make
from mtcompile.ir.graph import GET_ITEM, ConstRef, Graph, Node, Ref, const_key
from mtcompile.pass_infra import Pass, PassContext, PassResult, register

_CONV_LAYOUTS = {"data_layout": "NCHW", "kernel_layout": "OIHW", "out_layout": "NCHW"}


def why_not(graph: Graph, bn: Node, users: dict[str, list[str]], outputs: set[str]) -> str | None:
    """Why the batch-norm `bn` does not fold into the conv before it (None: it folds)."""
    if bn.op != "relax.nn.batch_norm":
        return "not a batch-norm"
    conv = graph.node(bn.args[0].name) if isinstance(bn.args[0], Ref) else None
    if conv is None or conv.op != "relax.nn.conv2d":
        return "its input is not a conv2d"
    if users[conv.name] != [bn.name] or conv.name in outputs:
        return f"conv %{conv.name} is read elsewhere too"
    if not all(isinstance(a, ConstRef) for a in (conv.args[1], *bn.args[1:])):
        return "weights or statistics are not constants"
    if not all(
        str(graph.constants[a.key].dtype) == "float32" for a in (conv.args[1], *bn.args[1:])
    ):
        return "weights or statistics are not float32"
    ca, ba = conv.attrs.obj, bn.attrs.obj
    for attr, want in _CONV_LAYOUTS.items():
        if str(getattr(ca, attr)) != want:
            return f"conv {attr} is {getattr(ca, attr)}, not {want}"
    if int(ba.axis) not in (1, -3) or not (bool(ba.center) and bool(ba.scale)):
        return "batch-norm is not a plain per-channel one over axis 1"
    items = users[bn.name]
    if (
        bn.name in outputs
        or not items
        or any(graph.node(u).op != GET_ITEM or graph.node(u).attrs != 0 for u in items)
    ):
        return "batch-norm statistics (items 1, 2) are read"
    if len(items) != 1:
        return "its result is read through several items"
    return None


def folded(graph: Graph, conv: Node, bn: Node) -> tuple[np.ndarray, np.ndarray]:
    """The conv weight and the (1, C, 1, 1) bias that replace conv + batch-norm."""
    w = graph.constants[conv.args[1].key]
    g, b, mean, var = (graph.constants[a.key] for a in bn.args[1:])
    eps = np.float32(float(bn.attrs.obj.epsilon))
    scale = g / np.sqrt(var + eps)
    bias = b - mean * scale
    return w * scale.reshape(-1, 1, 1, 1), bias.reshape(1, -1, 1, 1)


@register
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Folds inference batch-norms into the convolution before them (see the module)."""

    name = "fold-batch-norm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        users, outputs = graph.users(), graph.output_names()
        item_of = {}  # batch-norm -> its item 0, for the batch-norms that fold
        for n in graph.nodes:
            if n.op == "relax.nn.batch_norm" and why_not(graph, n, users, outputs) is None:
                item_of[n.name] = users[n.name][0]
        if not item_of:
            return PassResult(graph, False)
        new_nodes: dict[str, Node] = {}
        constants: dict[str, np.ndarray] = {}
        typeof = graph_types(graph, new_nodes, constants)
        replaced: dict[str, Node] = {}
        for bn_name, item in item_of.items():
            bn = graph.node(bn_name)
            conv = graph.node(bn.args[0].name)
            w, bias = folded(graph, conv, bn)
            wkey, bkey = const_key(w), const_key(bias)
            constants[wkey], constants[bkey] = w, bias
            replaced[conv.name] = replace(conv, args=(conv.args[0], ConstRef(wkey)))
            replaced[item] = make(
                typeof,
                item,
                graph.node(item).tenants,
                relax.op.add,
                [Ref(conv.name), ConstRef(bkey)],
            )
        nodes = [replaced.get(n.name, n) for n in graph.nodes if n.name not in item_of]
        out = Graph(tuple(nodes), graph.tenants, {**graph.constants, **constants})
        out = out.with_nodes(out.nodes)  # drop the weights and statistics no longer read
        return PassResult(out, True, {"folded": len(item_of)})
