"""offload-library: matmul/conv2d (float32; conv NCHW/OIHW) whose provider is a library
(``native`` or ``torch``) -> library call nodes; a constant per-channel bias added to one
alone joins the call, and then (native only) a ReLU/GELU or a same-shape residual add
that alone reads the result joins it as the kernel's epilogue; softmax and layer norm go to
native row kernels.

A library call node has op ``library_call`` and typed attrs (`mtcompile.ir.ops.LibraryCall`:
provider, kernel, variant, bias, epilogue, a conv's `ConvParams`), decided here once; the
bias is a 1-D constant argument, a residual the argument after it. A native matmul on a
constant 2-D weight (or a stack of them: horizontally fused tenants) takes the weight packed
here (variant ``packed``, `mtcompile.native.pack_dense`); a native 3x3 stride-1 conv on a
constant weight where Winograd's F(2x2, 3x3) pays (`winograd_pays`) takes the weight
transformed here (variant ``winograd``, `mtcompile.native.winograd_weights`), and a patch
embedding (`patch_conv`) its weight packed as a dense layer's (variant ``patch``). Where
matmul's provider is native (llvm), softmax and layer norm over the last axis become the
native row kernels (``mtcompile.native.softmax`` / ``layer_norm``; TVM's reductions run
scalar), and a scale and shift per slice after such a layer norm (fuse-horizontal's stacked
tenants) join its call. Lowering emits such a node as ``R.call_dps_packed``; fuse-vertical, the kernel model and plan-memory read it as a kernel
of its own. What the library takes is `mtcompile.ir.ops.LIBRARY`; `why_not` says why an
op stays a TVM op. Without this pass (``passes=[]`` or a list without it) every heavy op
stays a TVM op, whatever the providers say.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from tvm import relax

from mtcompile import native
from mtcompile.analysis.schedule import constant_only
from mtcompile.ir import ops
from mtcompile.ir.builder import graph_types, make
from mtcompile.ir.graph import ConstRef, Graph, Node, Ref, TensorTy, const_key
from mtcompile.pass_infra import Pass, PassContext, PassResult, option, register

log = logging.getLogger("mtcompile")


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
    for what, ty in (
        ("input", _ty(graph, n.args[0])),
        ("weight", _ty(graph, n.args[1])),
        ("result", n.ty if isinstance(n.ty, TensorTy) else None),
    ):
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
    return ops.ConvParams(
        tuple(map(int, attrs.strides)),
        tuple(map(int, attrs.padding)),
        tuple(map(int, attrs.dilation)),
        int(attrs.groups),
    )


def _library_calls(
    graph: Graph, ctx: PassContext, const: set[str]
) -> tuple[dict[str, Node], dict[str, str]]:
    """The heavy ops the library takes, as library call nodes by name; and for the others
    whose provider is a library, why each stays a TVM op."""
    calls: dict[str, Node] = {}
    left: dict[str, str] = {}
    for n in graph.nodes:
        if n.op not in ops.HEAVY:
            continue
        why = why_not(graph, n, ctx.kernels, const)
        if why is None:
            conv = _conv_params(n.attrs.obj) if n.op == "relax.nn.conv2d" else None
            call = ops.LibraryCall(
                ctx.kernels[ops.HEAVY[n.op]], ops.LIBRARY[n.op].kernel, conv=conv
            )
            calls[n.name] = Node(n.name, ops.LIBRARY_CALL, n.args[:2], n.ty, n.tenants, call)
        elif ctx.kernels.get(ops.HEAVY[n.op]) in ops.LIBRARY_PROVIDERS:
            left[n.name] = why
    return calls, left


def bias_channels(graph: Graph, arg, call: Node, const: set[str]) -> bool:
    """Whether `arg` is a constant (or a value of constants alone, in `const`) holding one
    float32 value per output channel of library call `call`, along its channel axis."""
    if isinstance(arg, Ref) and arg.name not in const:
        return False
    lib = ops.LIBRARY[call.attrs.computes]
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
    no other reader and the bias is per channel (addmm needs a 2-D weight); then, with
    `epilogues`, the native bias call's sole reader if it is a ReLU, a GELU or an add of a
    same-shape tensor (then a ReLU after that) -> the call with that epilogue."""

    name = "offload-library"
    epilogues: bool = option(
        True,
        doc="fold an activation or residual add that alone reads a native bias call into the call",
    )
    rows: bool = option(
        True,
        doc="softmax and layer norm over the last axis -> the native "
        "row kernels, where matmul's provider is native (llvm)",
    )
    precision: str = option(
        "float32",
        choices=("float32", "bfloat16"),
        doc="native dense layers, Winograd convs and patch embeddings on a constant weight: "
        "bfloat16 keeps the weight as bfloat16 and rounds the activations to it, summing in "
        "float32 (variants bf16, winograd_bf16, patch_bf16: about twice the float32 rate on "
        "CPUs with AVX-512 BF16, half the weight bytes; errors near 1e-3 of the output's "
        "scale, verify then allows 2e-2)",
    )
    conv_forms: bool = option(
        True,
        doc="native convs on a constant weight -> Winograd's F(2x2, 3x3) where it pays "
        "(`winograd_pays`) and a dense layer on the patches for a patch embedding "
        "(`patch_conv`), the weight transformed or packed here",
    )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        const = constant_only(graph)
        calls, left = _library_calls(graph, ctx, const)
        rows = (
            {}
            if not (self.rows and ctx.target == "llvm" and ctx.kernels.get("matmul") == "native")
            else _row_calls(graph, const)
        )
        if not calls and not rows:
            return PassResult(graph, False, {"library_calls": 0, "left_to_tvm": left})
        nodes, constants = self._fold_biases(graph, calls, const)
        biased = sum(1 for n in nodes if _call(n, bias=True))
        for _, eps in rows.values():
            constants.update(eps)
        out = Graph(graph.nodes, graph.tenants, {**graph.constants, **constants})
        if self.epilogues:
            nodes = _fold_epilogues(out, nodes)
        nodes = [rows[n.name][0] if n.name in rows else n for n in nodes]
        nodes, affine = _stacked_affine(out, nodes)
        out = Graph(out.nodes, out.tenants, {**out.constants, **affine})
        bf16 = self.precision == "bfloat16"
        if bf16 and not native.has_bf16_dot():
            log.warning(
                "offload-library: precision=bfloat16 on a CPU without AVX-512 BF16: its "
                "kernels run the rounded values on the float32 ones, at 0.77-0.94x their speed"
            )
        nodes, packed = _pack_dense(out, nodes, bf16)
        nodes, transformed = _conv_weights(out, nodes, bf16) if self.conv_forms else (nodes, {})
        out = Graph(out.nodes, out.tenants, {**out.constants, **packed, **transformed})
        return PassResult(
            out.with_nodes(nodes),
            True,
            {
                "library_calls": len(calls),
                "biases_folded": biased,
                "epilogues_folded": sum(1 for n in nodes if _call(n, epilogue=True)),
                "packed_weights": len(packed),
                "bf16_calls": _variants(nodes, "bf16", "winograd_bf16", "patch_bf16"),
                "winograd_convs": _variants(nodes, "winograd", "winograd_bf16"),
                "patch_convs": _variants(nodes, "patch", "patch_bf16"),
                "row_calls": len(rows),
                "left_to_tvm": left,
            },
        )

    @staticmethod
    def _fold_biases(
        graph: Graph, calls: dict[str, Node], const: set[str]
    ) -> tuple[list[Node], dict]:
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
            found = _biased_call(graph, n, calls, users, outputs, const)
            if found is None:
                continue
            call, bias, stacked = found
            flat, pre = _flat_bias(graph, n, call, bias, stacked, typeof, added, constants)
            into[n.name] = [
                *pre,
                Node(
                    n.name,
                    ops.LIBRARY_CALL,
                    (*call.args, flat),
                    n.ty,
                    n.tenants,
                    call.attrs.replace(bias=True),
                ),
            ]
            gone.add(call.name)
        out: list[Node] = []
        for n in graph.nodes:
            if n.name in gone:
                continue
            out.extend(into.get(n.name, [calls.get(n.name, n)]))
        return out, constants


def _biased_call(
    graph: Graph, n: Node, calls: dict[str, Node], users: dict, outputs, const: set[str]
) -> tuple[Node, object, np.ndarray | None] | None:
    """(call, bias, stacked bias or None) when the add `n` adds a per-channel bias the
    kernel takes to a library call it alone reads (no tenant output); else None."""
    for i in (0, 1):
        src, bias = n.args[i], n.args[1 - i]
        call = calls.get(src.name) if isinstance(src, Ref) else None
        if call is None or users[call.name] != [n.name] or call.name in outputs:
            continue
        stacked = _stacked_bias(graph, bias, call)
        if stacked is None and not bias_channels(graph, bias, call, const):
            continue
        lib = ops.LIBRARY[call.attrs.computes]
        if (
            stacked is None
            and lib.bias_weight_rank is not None
            and len(_ty(graph, call.args[1]).shape) != lib.bias_weight_rank
        ):
            continue
        return call, bias, stacked
    return None


def _flat_bias(
    graph: Graph,
    n: Node,
    call: Node,
    bias,
    stacked: np.ndarray | None,
    typeof,
    added: dict[str, Node],
    constants: dict[str, np.ndarray],
) -> tuple[ConstRef | Ref, list[Node]]:
    """(the bias as the kernel's 1-D argument, the nodes that compute it first); a new
    constant goes into `constants`, a new node into `added`."""
    channels = call.ty.shape[ops.LIBRARY[call.attrs.computes].bias_axis]
    if stacked is not None:  # one bias per stacked weight, flat: the packed kernel
        key = const_key(stacked)
        constants[key] = stacked
        return ConstRef(key), []
    if isinstance(bias, ConstRef):  # the kernel takes a 1-D bias
        arr = graph.constants[bias.key].reshape(channels)
        key = const_key(arr)
        constants[key] = arr
        return ConstRef(key), []
    # a value of constants alone: a reshape TVM folds with it
    pre = make(typeof, f"{n.name}.bias", n.tenants, relax.op.reshape, [bias], shape=[channels])
    added[pre.name] = pre
    return Ref(pre.name), [pre]


def _fold_epilogues(graph: Graph, nodes: list[Node]) -> list[Node]:
    """`nodes` with each ReLU/GELU or same-shape add that is the sole reader of a native bias
    call (not a tenant output) replaced by the call with that epilogue, named as the node it
    replaces; in order, so that a ReLU after a folded add folds too (``add_relu``).

    A matmul's result may reach the node through a reshape that keeps its last axis (a Linear
    on a 3-D input exports as reshape, addmm, reshape): the call then reads its input
    reshaped to match (a view) and gives the node's shape itself."""
    folder = _EpilogueFolder(graph, nodes)
    for n in nodes:
        folder.visit(n)
    return folder.result(nodes)


class _EpilogueFolder:
    """`_fold_epilogues`'s walk over the nodes, in order: what each name now holds."""

    def __init__(self, graph: Graph, nodes: list[Node]):
        self.graph = graph
        self.users: dict[str, list[str]] = {}
        for n in nodes:
            for r in n.inputs:
                self.users.setdefault(r, []).append(n.name)
        self.outputs = graph.output_names()
        self.cur: dict[str, Node] = {}  # name -> the node now under that name
        self.gone: set[str] = set()  # nodes that joined their reader
        self.added: dict[str, list[Node]] = {}  # name -> views to emit before it
        self.typeof = graph_types(graph, self.cur)

    def sole(self, name: str) -> bool:
        """`name` has one reader and is no tenant output."""
        return name not in self.outputs and len(self.users.get(name, [])) == 1

    def foldable(self, arg, epilogue: str) -> tuple[Node, Node | None] | None:
        """The call `arg` is (or reshapes), and the reshape, if it folds into a reader."""
        src = self.cur.get(arg.name) if isinstance(arg, Ref) else None
        view = None
        if (
            src is not None
            and src.op == "relax.reshape"
            and self.sole(src.name)
            and isinstance(src.args[0], Ref)
        ):
            view, src = src, self.cur.get(src.args[0].name)
            if (
                src is None
                or ops.computes(src) != "relax.matmul"
                or not isinstance(view.ty, TensorTy)
                or not view.ty.shape
                or view.ty.shape[-1] != src.ty.shape[-1]
            ):
                return None
        call = ops.library_call(src) if src is not None else None
        if (
            call is None
            or not call.bias
            or call.provider != "native"
            or call.epilogue != epilogue
            or not self.sole(src.name)
        ):
            return None
        return src, view

    def match(self, n: Node) -> tuple[tuple[Node, Node | None] | None, str, tuple]:
        """The call `n` would join as its epilogue (with the reshape between them, if any),
        the epilogue it makes, and the residual argument of an add."""
        if n.op in ops.EPILOGUE_ACTS and len(n.args) == 1:
            act = ops.EPILOGUE_ACTS[n.op]
            found = self.foldable(n.args[0], "")
            if found is None and act == "relu":
                return self.foldable(n.args[0], "add"), "add_relu", ()
            return found, act, ()
        if n.op == "relax.add" and len(n.args) == 2 and isinstance(n.ty, TensorTy):
            for i in (0, 1):
                found, residual = self.foldable(n.args[i], ""), (n.args[1 - i],)
                if (
                    found is not None
                    and _ty(self.graph, residual[0]) == n.ty
                    and residual[0] not in (Ref(found[0].name), n.args[i])
                ):
                    return found, "add", residual
        return None, "", ()

    def visit(self, n: Node) -> None:
        """`n`, or the call it joins as the epilogue, under `n`'s name."""
        found, epilogue, residual = self.match(n)
        if found is None:
            self.cur[n.name] = n
            return
        src, view = found
        args = src.args
        if view is not None:  # the call's input as a view of the node's leading shape
            k = self.typeof(args[0]).shape[-1]
            pre = make(
                self.typeof,
                f"{n.name}.in",
                n.tenants,
                relax.op.reshape,
                [args[0]],
                shape=[*n.ty.shape[:-1], k],
            )
            self.cur[pre.name] = pre
            self.added.setdefault(n.name, []).append(pre)
            args = (Ref(pre.name), *args[1:])
            self.gone.add(view.name)
        tenants = tuple(dict.fromkeys((*src.tenants, *n.tenants)))
        self.cur[n.name] = Node(
            n.name,
            ops.LIBRARY_CALL,
            (*args, *residual),
            n.ty,
            tenants,
            src.attrs.replace(epilogue=epilogue),
        )
        self.gone.add(src.name)

    def result(self, nodes: list[Node]) -> list[Node]:
        """The nodes in order, each preceded by the views it added, without those folded."""
        out: list[Node] = []
        for n in nodes:
            out.extend(self.added.get(n.name, []))
            if n.name not in self.gone:
                out.append(self.cur[n.name])
        return out


def _row_calls(graph: Graph, const: set[str]) -> dict[str, tuple[Node, dict]]:
    """Softmax and layer norm (affine) over the last axis of a float32 tensor -> the native
    row kernels (`ops.ROW_KERNELS`), by node name, each with the constants it adds (layer
    norm's epsilon, a 1-element argument)."""
    out: dict[str, tuple[Node, dict]] = {}
    for n in graph.nodes:
        ty = n.ty
        if (
            n.op not in ops.ROW_KERNELS
            or n.name in const
            or not isinstance(ty, TensorTy)
            or ty.dtype != "float32"
            or not ty.shape
        ):
            continue
        row = _softmax_call(n) if n.op == "relax.nn.softmax" else _layer_norm_call(graph, n)
        if row is not None:
            out[n.name] = row
    return out


def _softmax_call(n: Node) -> tuple[Node, dict] | None:
    """The native softmax call for softmax `n` over its last axis (no constants); else None."""
    if int(n.attrs.obj.axis) not in (-1, len(n.ty.shape) - 1):
        return None
    call = Node(
        n.name, ops.LIBRARY_CALL, n.args[:1], n.ty, n.tenants, ops.LibraryCall("native", "softmax")
    )
    return call, {}


def _layer_norm_call(graph: Graph, n: Node) -> tuple[Node, dict] | None:
    """The native layer norm call for layer norm `n` over its last axis with a float32 scale
    and shift of that axis's size, and its epsilon as a new constant; else None."""
    attrs, ty = n.attrs.obj, n.ty
    axes = [int(a) for a in attrs.axes]
    affine = [_ty(graph, a) for a in n.args[1:3]]
    if not (
        axes in ([-1], [len(ty.shape) - 1])
        and bool(attrs.center)
        and bool(attrs.scale)
        and all(t == TensorTy((ty.shape[-1],), "float32") for t in affine)
    ):
        return None
    eps = np.array([float(attrs.epsilon)], np.float32)
    key = const_key(eps)
    call = Node(
        n.name,
        ops.LIBRARY_CALL,
        (*n.args[:3], ConstRef(key)),
        ty,
        n.tenants,
        ops.LibraryCall("native", "layer_norm"),
    )
    return call, {key: eps}


def _stacked_affine(graph: Graph, nodes: list[Node]) -> tuple[list[Node], dict]:
    """add(multiply(ln, G), Bt) with ln a native layer norm call read by the multiply alone,
    the multiply by the add alone, and G, Bt float32 constants [B, 1.., N] (one scale and
    shift per slice of the first axis: fuse-horizontal's layer norm of B tenants) -> the
    layer norm call with gamma and beta of B x N values, named as the add (the native kernel
    takes N per slice); the new constants."""
    view = graph.with_nodes(nodes)
    users, outputs = view.users(), view.output_names()
    by_name = {n.name: n for n in nodes}

    def sole(name: str) -> Node | None:
        u = users.get(name, [])
        return by_name[u[0]] if len(u) == 1 and name not in outputs else None

    def per_slice(a, shape) -> np.ndarray | None:
        arr = graph.constants.get(a.key) if isinstance(a, ConstRef) else None
        want = (shape[0], *(1,) * (len(shape) - 2), shape[-1])
        ok = arr is not None and arr.dtype == np.float32 and arr.shape == want
        return arr.reshape(shape[0], shape[-1]) if ok and shape[0] > 1 else None

    replaced, dropped, made = {}, set(), {}
    for n in nodes:
        call = ops.library_call(n)
        if call is None or call.kernel != "layer_norm" or len(n.ty.shape) < 2:
            continue
        mul = sole(n.name)
        add = sole(mul.name) if mul is not None and mul.op == "relax.multiply" else None
        if add is None or add.op != "relax.add" or mul.args[0] != Ref(n.name):
            continue
        scale, shift = per_slice(mul.args[1], n.ty.shape), per_slice(add.args[1], n.ty.shape)
        if scale is None or shift is None or add.args[0] != Ref(mul.name) or add.ty != n.ty:
            continue
        g0, b0 = (graph.constants[a.key] for a in n.args[1:3])
        gamma, beta = (g0 * scale).reshape(-1), (b0 * scale + shift).reshape(-1)
        args = [n.args[0]]
        for arr in (gamma, beta):
            made[const_key(arr)] = arr
            args.append(ConstRef(const_key(arr)))
        replaced[add.name] = replace(n, name=add.name, args=(*args, n.args[3]))
        dropped |= {n.name, mul.name}
    out = [replaced.get(n.name, n) for n in nodes if n.name not in dropped]
    return out, made


def _call(n: Node, bias: bool = False, epilogue: bool = False) -> bool:
    """Whether `n` is a library call (with a bias / with an epilogue, when asked)."""
    c = ops.library_call(n)
    return c is not None and (not bias or c.bias) and (not epilogue or bool(c.epilogue))


def _dense_weights(w, graph: Graph) -> list[tuple[ConstRef, bool]] | None:
    """A dense weight argument as its constants: [(constant, transposed)] for a constant or a
    transposed constant (a Linear's weight arrives through ``permute_dims``), one per slice
    for a ``stack`` on axis 0 of such weights (horizontally fused tenants); else None."""
    if isinstance(w, ConstRef):
        return [(w, False)]
    if not (isinstance(w, Ref) and w.name in graph):
        return None
    src = graph.node(w.name)
    # (a get_item node's attrs is its index, an int: only Opaque attrs carry TVM attrs)
    attrs = getattr(src.attrs, "obj", None)
    if src.op == "relax.permute_dims" and isinstance(src.args[0], ConstRef):
        axes = getattr(attrs, "axes", None)
        return [(src.args[0], True)] if axes is None or [int(x) for x in axes] == [1, 0] else None
    if src.op == "relax.stack" and int(getattr(attrs, "axis", -1)) == 0:
        parts = [_dense_weights(x, graph) for x in src.args[0]]
        if all(q is not None and len(q) == 1 for q in parts):
            return [q[0] for q in parts]
    return None


def _dense_parts(node: Node, graph: Graph) -> tuple[list[np.ndarray], bool] | None:
    """For a native matmul call on a constant 2-D float32 weight (a dense layer), or on a
    stack of them (the weights of horizontally fused tenants, one per slice of the
    activations' first dimension): (the weights as [K, N] arrays, whether stacked). None for
    any other node."""
    call = ops.library_call(node)
    if call is None or (call.provider, call.kernel, call.variant) != ("native", "matmul", ""):
        return None
    parts = _dense_weights(node.args[1], graph)
    if not parts:
        return None
    values = [graph.constants[c.key] for c, _ in parts]
    if any(v.ndim != 2 or v.dtype != np.float32 or v.shape != values[0].shape for v in values):
        return None
    weights = [v.T if t else v for v, (_, t) in zip(values, parts, strict=True)]
    w = node.args[1]
    if not (isinstance(w, Ref) and graph.node(w.name).op == "relax.stack"):
        return weights, False
    # one weight per slice of the activations' first dimension (not broadcast over it)
    a = node.args[0]
    a_shape = (
        getattr(graph.node(a.name).ty, "shape", ())
        if isinstance(a, Ref) and a.name in graph
        else ()
    )
    shape = getattr(node.ty, "shape", ())
    if len(shape) < 3 or len(a_shape) != len(shape) or not shape[0] == a_shape[0] == len(parts):
        return None
    return weights, True


def packed_weight(node: Node, graph: Graph, bf16: bool = False) -> np.ndarray | None:
    """The weight of a dense call (`_dense_parts`) packed for the ``packed`` variant
    (`mtcompile.native.pack_dense`), or with `bf16` for the ``bf16`` one
    (`mtcompile.native.pack_dense_bf16`); [B, ...] for a stack. None for any other node."""
    found = _dense_parts(node, graph)
    if found is None:
        return None
    weights, stacked = found
    pack = native.pack_dense_bf16 if bf16 else native.pack_dense
    packed = [pack(w) for w in weights]
    return np.stack(packed) if stacked else packed[0]


def _stacked_bias(graph: Graph, bias, call: Node) -> np.ndarray | None:
    """A bias of horizontally fused dense layers: a constant [B, 1.., N] that adds one row
    per slice to a native matmul on B stacked weights (`_dense_parts`), as the B x N values
    the packed kernel takes (bias b for slice b). None for any other bias."""
    found = _dense_parts(call, graph) if isinstance(bias, ConstRef) else None
    if found is None or not found[1]:
        return None
    arr, shape = graph.constants[bias.key], call.ty.shape
    want = (shape[0], *(1,) * (len(shape) - 2), shape[-1])
    return arr.reshape(-1) if arr.dtype == np.float32 and arr.shape == want else None


def _pack_dense(
    graph: Graph, nodes: list[Node], bf16: bool
) -> tuple[list[Node], dict[str, np.ndarray]]:
    """`nodes` with each native matmul call whose weight packs (`packed_weight`) turned into
    the ``packed`` variant (with `bf16`: ``bf16``) reading the packed constant, and the nodes
    that only computed such weights (a transpose, a stack) dropped; the packed constants."""
    view = graph.with_nodes(nodes)
    out, packed = [], {}
    for n in nodes:
        arr = packed_weight(n, view, bf16)
        if arr is not None:
            key = const_key(arr)
            packed[key] = arr
            n = replace(
                n,
                args=(n.args[0], ConstRef(key), *n.args[2:]),
                attrs=n.attrs.replace(variant="bf16" if bf16 else "packed"),
            )
        out.append(n)
    if not packed:
        return out, packed
    live, still = view.live_nodes(), view.with_nodes(out).live_nodes()
    return [n for n in out if n.name in still or n.name not in live], packed


def _variants(nodes: list[Node], *variants: str) -> int:
    return sum(1 for n in nodes if getattr(ops.library_call(n), "variant", "") in variants)


def winograd_pays(call: ops.LibraryCall, weight: TensorTy, out: TensorTy) -> bool:
    """Whether a native conv call runs faster as Winograd's F(2x2, 3x3): a 3x3 kernel at
    stride 1, dilation 1, one group, 16+ input and output channels, float32, and tiles that
    fill the 16 lanes of a vector nearly as well as the direct form's output columns do (it
    does 2.25x fewer multiply-adds; at 14x14 its 7 tiles per row fill 7 of 16 lanes, the
    direct form 14 of 16, and it is no faster)."""
    conv = call.conv
    if not (
        call.provider == "native"
        and call.kernel == "conv2d"
        and not call.variant
        and conv is not None
        and conv.strides == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and weight.dtype == "float32"
        and len(weight.shape) == 4
        and tuple(weight.shape[2:]) == (3, 3)
        and min(weight.shape[:2]) >= 16
    ):
        return False
    if not isinstance(out.shape[3], int):  # a symbolic width: no lane count to weigh
        return False
    ow = out.shape[3]
    tiles = (ow + 1) // 2
    lanes = tiles / (-(-tiles // 16) * 16)  # the share of lanes holding a tile
    direct = ow / (-(-ow // 16) * 16)  # the direct form's share
    return 2.25 * lanes / direct >= 1.5


def patch_conv(call: ops.LibraryCall, weight: TensorTy) -> bool:
    """Whether a native conv call is a patch embedding that runs as a dense layer on its
    patches (the ``patch`` variant): its stride is its kernel's size, 8x8 or more (a ViT's
    16x16 at 96x96: 112 against 153 us; a 4x4 stem at 224x224 is faster direct, 466 against
    598 us), unpadded, undilated, one group, float32."""
    conv = call.conv
    return (
        call.provider == "native"
        and call.kernel == "conv2d"
        and not call.variant
        and conv is not None
        and weight.dtype == "float32"
        and len(weight.shape) == 4
        and conv.strides == tuple(weight.shape[2:])
        and min(conv.strides) >= 8
        and conv.padding == (0, 0, 0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def _conv_weights(
    graph: Graph, nodes: list[Node], bf16: bool
) -> tuple[list[Node], dict[str, np.ndarray]]:
    """`nodes` with each native conv call on a constant weight where Winograd pays
    (`winograd_pays`) turned into the ``winograd`` variant reading the weight transformed
    (`mtcompile.native.winograd_weights`; with `bf16` the ``winograd_bf16`` one,
    `winograd_weights_bf16`), and each patch embedding (`patch_conv`) into the ``patch``
    variant reading it packed as a dense layer's (`mtcompile.native.pack_dense`; with `bf16`
    ``patch_bf16``, `pack_dense_bf16`); the new constants."""
    out, made = [], {}
    for n in nodes:
        call = ops.library_call(n)
        w = n.args[1] if call is not None and call.kernel == "conv2d" else None
        variant, arr = "", None
        if isinstance(w, ConstRef) and winograd_pays(call, _ty(graph, w), n.ty):
            weight = graph.constants[w.key]
            variant, arr = (
                ("winograd_bf16", native.winograd_weights_bf16(weight))
                if bf16
                else ("winograd", native.winograd_weights(weight))
            )
        elif isinstance(w, ConstRef) and patch_conv(call, _ty(graph, w)):
            weight = graph.constants[w.key]
            pack = native.pack_dense_bf16 if bf16 else native.pack_dense
            variant = "patch_bf16" if bf16 else "patch"
            arr = pack(np.ascontiguousarray(weight.reshape(weight.shape[0], -1).T))
        if arr is not None:
            key = const_key(arr)
            made[key] = arr
            n = replace(
                n,
                args=(n.args[0], ConstRef(key), *n.args[2:]),
                attrs=n.attrs.replace(variant=variant),
            )
        out.append(n)
    return out, made
