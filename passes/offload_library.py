"""offload-library: matmul/conv2d (float32; conv NCHW/OIHW) whose provider is a library
(``native`` or ``torch``) -> library call nodes; a constant per-channel bias added to one
alone joins the call.

The node op is the provider's kernel name (``mtcompile.<provider>.matmul`` / ``matmul_bias``
/ ``conv2d`` / ``conv2d_bias``, see `mtcompile.ir.ops`); a conv carries its `ConvParams`
as attrs; the bias is a 1-D constant argument. Lowering emits such a node as
``R.call_dps_packed``; fuse-vertical, the kernel model and plan-memory read it as a kernel
of its own. What the library takes is `mtcompile.ir.ops.LIBRARY`; `why_not` says why an
op stays a TVM op. Without this pass (``passes=[]`` or a list without it) every heavy op
stays a TVM op, whatever the providers say.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from mtcompile.analysis.schedule import constant_only
from mtcompile.ir import ops
from mtcompile.ir.builder import graph_types, make
from mtcompile.ir.graph import ConstRef, Graph, Node, Ref, TensorTy, const_key
from mtcompile.pass_infra import Pass, PassContext, PassResult, register


def _ty(graph: Graph, a) -> TensorTy | None:
    if isinstance(a, ConstRef):
        c = graph.constants[a.key]
        return TensorTy(tuple(c.shape), str(c.dtype))
    ty = graph.node(a.name).ty if isinstance(a, Ref) else None
    return ty if isinstance(ty, TensorTy) else None


def why_not(graph: Graph, n: Node, providers: dict[str, str], const: set[str]) -> str | None:
    """Why heavy op `n` stays a TVM op (None: it becomes a library call)."""
    kind = ops.HEAVY[n.op]
    if providers.get(kind) not in ops.LIBRARY_PROVIDERS:
        return f"the provider of {kind} is {providers.get(kind, 'tvm')}"
    if n.name in const:
        return "computed from constants alone (TVM folds it)"
    lib = ops.LIBRARY[n.op]
    for what, ty in (("input", _ty(graph, n.args[0])), ("weight", _ty(graph, n.args[1])),
                     ("result", n.ty if isinstance(n.ty, TensorTy) else None)):
        if ty is None or ty.dtype not in lib.dtypes:
            got = ty.dtype if ty is not None else "not a tensor"
            return f"{what} dtype {got}; the library takes {'/'.join(lib.dtypes)}"
    attrs = n.attrs.obj if n.attrs is not None else None
    for attr, want in lib.layouts.items():
        if str(getattr(attrs, attr)) != want:
            return f"{attr} {getattr(attrs, attr)}; the library takes {want}"
    out_dtype = getattr(attrs, "out_dtype", None)
    # "" or None (the ONNX importer) when it is the input's dtype
    if out_dtype is not None and str(out_dtype) not in ("", *lib.dtypes):
        return f"out_dtype {out_dtype}; the library takes {'/'.join(lib.dtypes)}"
    return None


def _conv_params(attrs) -> ops.ConvParams:
    return ops.ConvParams(tuple(map(int, attrs.strides)), tuple(map(int, attrs.padding)),
                          tuple(map(int, attrs.dilation)), int(attrs.groups))


def bias_channels(graph: Graph, arg, call: Node, const: set[str]) -> bool:
    """Whether `arg` is a constant (or a value of constants alone, in `const`) holding one
    float32 value per output channel of library call `call`, along its channel axis."""
    if isinstance(arg, Ref) and arg.name not in const:
        return False
    lib = ops.LIBRARY[ops.LIBRARY_CALLS[call.op]]
    ty = _ty(graph, arg)
    if ty is None or ty.dtype not in lib.dtypes:
        return False
    rank = len(call.ty.shape)
    n = call.ty.shape[lib.bias_axis]
    size = int(np.prod(ty.shape, dtype=np.int64))
    if size != n or len(ty.shape) > rank:
        return False
    padded = (1,) * (rank - len(ty.shape)) + tuple(ty.shape)  # broadcast shape, right-aligned
    return padded[lib.bias_axis] == n


@register
@dataclass(frozen=True)
class OffloadLibrary(Pass):
    """Heavy ops whose provider (`PassContext.kernels`) is a library and that the library
    takes -> library call nodes; then add(call, bias) -> one bias call where the call has
    no other reader and the bias is per channel (addmm needs a 2-D weight)."""

    name = "offload-library"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        const = constant_only(graph)
        calls: dict[str, Node] = {}
        left: dict[str, str] = {}  # heavy op -> why it stays a TVM op (library providers only)
        for n in graph.nodes:
            if n.op not in ops.HEAVY:
                continue
            why = why_not(graph, n, ctx.kernels, const)
            if why is None:
                lib = ops.LIBRARY[n.op]
                attrs = _conv_params(n.attrs.obj) if n.op == "relax.nn.conv2d" else None
                call = lib.call(ctx.kernels[ops.HEAVY[n.op]])
                calls[n.name] = Node(n.name, call, n.args[:2], n.ty, n.tenants, attrs)
            elif ctx.kernels.get(ops.HEAVY[n.op]) in ops.LIBRARY_PROVIDERS:
                left[n.name] = why
        if not calls:
            return PassResult(graph, False, {"library_calls": 0, "left_to_tvm": left})
        nodes, constants = self._fold_biases(graph, calls, const)
        biased = sum(1 for n in nodes if n.op in ops.BIAS_CALLS)
        out = Graph(graph.nodes, graph.tenants, {**graph.constants, **constants})
        return PassResult(out.with_nodes(nodes), True, {
            "library_calls": len(calls), "biases_folded": biased, "left_to_tvm": left})

    @staticmethod
    def _fold_biases(graph: Graph, calls: dict[str, Node],
                     const: set[str]) -> tuple[list[Node], dict]:
        """The graph's nodes with `calls` in place, each add of a sole-use call and a
        per-channel bias turned into the bias call (named as the add); new constants."""
        users, outputs = graph.users(), graph.output_names()
        added: dict[str, Node] = {}
        constants: dict[str, np.ndarray] = {}
        typeof = graph_types(graph, added, constants)
        into: dict[str, list[Node]] = {}  # add -> the nodes that replace it
        gone: set[str] = set()  # calls that joined the add after them
        for n in graph.nodes:
            if n.op != "relax.add" or len(n.args) != 2:
                continue
            for i in (0, 1):
                src, bias = n.args[i], n.args[1 - i]
                call = calls.get(src.name) if isinstance(src, Ref) else None
                if (call is None or users[call.name] != [n.name] or call.name in outputs
                        or not bias_channels(graph, bias, call, const)):
                    continue
                lib = ops.LIBRARY[ops.LIBRARY_CALLS[call.op]]
                if lib.bias_weight_rank is not None and len(
                        _ty(graph, call.args[1]).shape) != lib.bias_weight_rank:
                    continue
                channels = call.ty.shape[lib.bias_axis]
                if isinstance(bias, ConstRef):  # the kernel takes a 1-D bias
                    arr = graph.constants[bias.key].reshape(channels)
                    key = const_key(arr)
                    constants[key] = arr
                    flat, pre = ConstRef(key), []
                else:  # a value of constants alone: a reshape TVM folds with it
                    pre = [make(typeof, f"{n.name}.bias", n.tenants, relax.op.reshape,
                                [bias], shape=[channels])]
                    added[pre[0].name] = pre[0]
                    flat = Ref(pre[0].name)
                bias_call = lib.call(ops.CALL_PROVIDER[call.op], bias=True)
                into[n.name] = [*pre, Node(n.name, bias_call, (*call.args, flat), n.ty,
                                           n.tenants, call.attrs)]
                gone.add(call.name)
                break
        out: list[Node] = []
        for n in graph.nodes:
            if n.name in gone:
                continue
            out.extend(into.get(n.name, [calls.get(n.name, n)]))
        return out, constants
