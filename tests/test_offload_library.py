"""offload-library and fold-batch-norm: structure (Relax in, library call nodes out),
negatives with their reasons, and numerics of the built module against numpy/PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import tiny_conv
from torch import nn
from tvm import relax

import mtcompile
from mtcompile.analysis.schedule import constant_only
from mtcompile.backend.lowering import build, emit_module, library_calls
from mtcompile.frontend.importers import import_tenant
from mtcompile.frontend.lift import lift
from mtcompile.ir import ops
from mtcompile.ir.graph import GET_ITEM, INPUT, TUPLE, ConstRef, Graph, Ref
from mtcompile.native import table
from mtcompile.pass_infra import PassContext, run_passes
from mtcompile.passes import build_pipeline
from mtcompile.passes.fold_batch_norm import FoldBatchNorm
from mtcompile.passes.offload_library import OffloadLibrary
from mtcompile.runtime import library

ATOL = 1e-4
LIBRARY = {"matmul": "native", "conv2d": "native"}  # the default library provider
TVM = {"matmul": "tvm", "conv2d": "tvm"}
TORCH = {"matmul": "torch", "conv2d": "torch"}  # PyTorch's kernels
MIXED = {"matmul": "tvm", "conv2d": "native"}


def sym(
    kernel: str, variant: str = "", bias: bool = False, epilogue: str = "", provider: str = "native"
) -> str:
    """The symbol of a library call the table lists."""
    return table.find(provider, kernel, variant, bias, epilogue).symbol


MATMUL, MATMUL_BIAS = sym("matmul"), sym("matmul", bias=True)
DENSE, DENSE_BIAS = sym("matmul", "packed"), sym("matmul", "packed", bias=True)
CONV2D, CONV2D_BIAS = sym("conv2d"), sym("conv2d", bias=True)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def one_function(build_body, params: list[tuple[str, tuple, str]]) -> Graph:
    """Tenant "main" of one Relax function over `params`, returning `build_body(bb, *vars)`."""
    bb = relax.BlockBuilder()
    args = [relax.Var(n, relax.TensorType(shape, dtype)) for n, shape, dtype in params]
    with bb.function("main", args):
        with bb.dataflow():
            gv = bb.emit_output(build_body(bb, *args))
        bb.emit_func_output(gv)
    return lift(bb.get()["main"], "main")


def lifted(model: nn.Module, *inputs) -> Graph:
    """`model` imported and lifted as compile does; its tenant is "t"."""
    it = import_tenant(mtcompile.Tenant("t", model, example_inputs=inputs))
    return lift(it.mod["main"], "t", it.input_names)


def const(arr: np.ndarray) -> relax.Expr:
    return relax.const(arr, dtype=str(arr.dtype))


def offloaded(graph: Graph, providers: dict, **options) -> tuple[Graph, dict]:
    """fold-batch-norm then offload-library (with `options`), as the default pipeline runs
    them; the graph and offload-library's facts."""
    ctx = PassContext("llvm", providers)
    pipeline = build_pipeline(
        ["fold-batch-norm", "offload-library"], {"offload-library": options} if options else None
    )
    out, records = run_passes(graph, pipeline, ctx)
    out.verify()
    return out, records[-1].info


def ops_of(graph: Graph) -> list[str]:
    """The ops that run, in order (TVM folds values of constants alone; tuples are no ops)."""
    const = constant_only(graph)
    return [
        sym_of(n)
        for n in graph.nodes
        if n.op not in (INPUT, TUPLE, GET_ITEM) and n.name not in const
    ]


def sym_of(n) -> str:
    """A library call's symbol, any other node's op."""
    return n.attrs.symbol if ops.is_library_call(n.op) else n.op


def run(graph: Graph, *inputs: np.ndarray, tenant: str = "main") -> list[np.ndarray]:
    """Lower and build `graph` as compile does and run `tenant`'s entry on a bare VM (PyTorch's
    kernels registered, as the runtime registers them for a bundle that calls them)."""
    library.register()
    ex, _ = build(emit_module(graph), "llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())[tenant](*[tvm.runtime.tensor(x) for x in inputs])
    return [o.numpy() for o in out] if not hasattr(out, "numpy") else [out.numpy()]


W84 = _rng(0).standard_normal((8, 4)).astype(np.float32)
B4 = _rng(1).standard_normal(4).astype(np.float32)
X28 = _rng(2).standard_normal((2, 8)).astype(np.float32)


# --------------------------------------------------------------------------- structure


def test_float32_matmul_becomes_a_library_call_node():
    g = one_function(lambda bb, x: relax.op.matmul(x, const(W84)), [("x", (2, 8), "float32")])
    out, info = offloaded(g, LIBRARY)
    # the constant weight is packed for the native dense kernel, decided on the graph
    assert ops_of(out) == [DENSE] and info["library_calls"] == 1
    (call,) = [n for n in out.nodes if sym_of(n) == DENSE]
    assert call.attrs == ops.LibraryCall("native", "matmul", variant="packed")
    assert str(call).startswith(f"%{call.name} = library_call(%main.x, @")
    assert "{kernel=matmul, provider=native, variant=packed}" in str(call)
    assert str(call).endswith("{tenant=main} : f32[2,4]")
    (got,) = run(out, X28)
    np.testing.assert_allclose(got, X28 @ W84, rtol=0, atol=1e-5)


def test_nchw_conv_becomes_a_library_call_with_its_parameters():
    w = _rng(3).standard_normal((6, 2, 3, 3)).astype(np.float32)

    def body(bb, x):
        return relax.op.nn.conv2d(
            x, const(w), strides=(2, 1), padding=(0, 1, 1, 2), dilation=(1, 2), groups=2
        )

    g = one_function(body, [("x", (1, 4, 9, 9), "float32")])
    out, _ = offloaded(g, LIBRARY)
    assert ops_of(out) == [CONV2D]
    (call,) = [n for n in out.nodes if sym_of(n) == CONV2D]
    # stride h/w, padding top/left/bottom/right, dilation h/w, groups
    assert call.attrs.conv.flat() == [2, 1, 0, 1, 1, 2, 1, 2, 2]
    assert (
        "{kernel=conv2d, provider=native, strides=[2, 1], padding=[0, 1, 1, 2], "
        "dilation=[1, 2], groups=2}"
    ) in str(call)
    x = _rng(4).standard_normal((1, 4, 9, 9)).astype(np.float32)
    want = torch.nn.functional.conv2d(
        torch.nn.functional.pad(torch.from_numpy(x), (1, 2, 0, 1)),
        torch.from_numpy(w),
        stride=(2, 1),
        dilation=(1, 2),
        groups=2,
    ).numpy()
    for providers in (LIBRARY, TORCH, TVM):
        (got,) = run(offloaded(g, providers)[0], x)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_linear_bias_is_folded_into_matmul_bias():
    lin = nn.Linear(8, 4).eval()
    g = lifted(lin, torch.from_numpy(X28))
    assert "relax.matmul" in ops_of(g) and "relax.add" in ops_of(g)
    out, info = offloaded(g, LIBRARY)
    assert ops_of(out) == [DENSE_BIAS]
    assert info == {
        "library_calls": 1,
        "biases_folded": 1,
        "epilogues_folded": 0,
        "packed_weights": 1,
        "bf16_calls": 0,
        "winograd_convs": 0,
        "patch_convs": 0,
        "row_calls": 0,
        "left_to_tvm": {},
    }
    # one call in the tenant's entry and one in run_all: offload-library gave the native dense
    # kernel the Linear's weight packed at build time
    packed = DENSE_BIAS
    assert library_calls(emit_module(out)) == [packed, packed]
    (call,) = [n for n in out.nodes if sym_of(n) == DENSE_BIAS]
    bias = call.args[2]
    assert isinstance(bias, ConstRef)  # the 1-D bias of the layer
    np.testing.assert_array_equal(out.constants[bias.key], lin.bias.detach().numpy())
    (got,) = run(out, X28, tenant="t")
    with torch.no_grad():
        np.testing.assert_allclose(got, lin(torch.from_numpy(X28)).numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_conv_bias_of_constants_alone_joins_the_call_through_a_folded_reshape():
    conv = nn.Conv2d(2, 4, 3).eval()  # torch's import adds reshape(bias, (1, 4, 1, 1))
    x = torch.from_numpy(_rng(5).standard_normal((1, 2, 6, 6)).astype(np.float32))
    out, _ = offloaded(lifted(conv, x), LIBRARY)
    assert ops_of(out) == [CONV2D_BIAS]
    (call,) = [n for n in out.nodes if sym_of(n) == CONV2D_BIAS]
    flat = out.node(call.args[2].name)
    assert flat.op == "relax.reshape" and flat.ty.shape == (4,)  # folded by TVM
    (got,) = run(out, x.numpy(), tenant="t")
    with torch.no_grad():
        np.testing.assert_allclose(got, conv(x).numpy(), rtol=0, atol=ATOL)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_conv_batchnorm_folds_into_conv_with_bias():
    model, (x,) = tiny_conv(0)  # conv (no bias) -> batch-norm -> relu -> mean -> linear
    g = lifted(model, x)
    assert "relax.nn.batch_norm" in ops_of(g)
    folded = FoldBatchNorm().run(g, PassContext())
    assert folded.info == {"folded": 1}
    assert "relax.nn.batch_norm" not in ops_of(folded.graph)
    out, info = offloaded(g, LIBRARY)
    assert ops_of(out) == [CONV2D_BIAS + "_relu", "relax.mean", DENSE_BIAS]  # relu joins
    assert info["library_calls"] == 2 and info["biases_folded"] == 2
    with torch.no_grad():
        want = model(x).numpy()
    for providers in (LIBRARY, TORCH, TVM):
        (got,) = run(offloaded(g, providers)[0], x.numpy(), tenant="t")
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_folded_weights_are_tvms_formula():
    model, (x,) = tiny_conv(0)
    out = FoldBatchNorm().run(lifted(model, x), PassContext()).graph
    conv = next(n for n in out.nodes if n.op == "relax.nn.conv2d")
    add = next(n for n in out.nodes if n.op == "relax.add" and Ref(conv.name) in n.args)
    bn = model.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    w = model.conv.weight.detach().numpy() * scale.reshape(-1, 1, 1, 1)
    b = (bn.bias - bn.running_mean * torch.from_numpy(scale)).detach().numpy()
    np.testing.assert_allclose(out.constants[conv.args[1].key], w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        out.constants[add.args[1].key], b.reshape(1, -1, 1, 1), rtol=1e-6, atol=1e-7
    )


def test_tvm_provider_leaves_the_graph_alone():
    model, inputs = tiny_conv(0)
    g = FoldBatchNorm().run(lifted(model, *inputs), PassContext()).graph
    result = OffloadLibrary().run(g, PassContext("llvm", TVM))
    assert result.graph is g and not result.changed
    assert result.info == {"library_calls": 0, "left_to_tvm": {}}


def test_mixed_providers_offload_only_their_kind():
    model, inputs = tiny_conv(0)
    g = lifted(model, *inputs)
    calls = ops_of(offloaded(g, MIXED)[0])
    assert calls[0] == CONV2D_BIAS + "_relu" and "relax.matmul" in calls
    assert not any(c.startswith(DENSE) for c in calls)
    calls = ops_of(offloaded(g, {"matmul": "native", "conv2d": "tvm"})[0])
    assert "relax.nn.conv2d" in calls and calls[-1] == DENSE_BIAS


# --------------------------------------------------------------------------- negative


@pytest.mark.parametrize("out_dtype", ["int32", "float32"])
@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_int_matmul_stays_a_tvm_op(out_dtype):
    w = _rng(5).integers(-3, 4, (8, 4)).astype(np.int32)
    g = one_function(
        lambda bb, x: relax.op.matmul(x, const(w), out_dtype=out_dtype), [("x", (2, 8), "int32")]
    )
    out, info = offloaded(g, LIBRARY)
    assert ops_of(out) == ["relax.matmul"] and info["library_calls"] == 0
    (name,) = info["left_to_tvm"]
    assert info["left_to_tvm"][name] == "input dtype int32; the library takes float32"
    x = _rng(6).integers(-3, 4, (2, 8)).astype(np.int32)
    (got,) = run(out, x)
    assert got.dtype == out_dtype
    np.testing.assert_array_equal(got, (x @ w).astype(out_dtype))


def test_negative_float16_matmul_stays_a_tvm_op():
    w = _rng(15).standard_normal((8, 4)).astype(np.float16)
    g = one_function(lambda bb, x: relax.op.matmul(x, const(w)), [("x", (2, 8), "float16")])
    out, info = offloaded(g, LIBRARY)
    assert ops_of(out) == ["relax.matmul"]
    assert list(info["left_to_tvm"].values()) == ["input dtype float16; the library takes float32"]


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_nhwc_conv_stays_a_tvm_op():
    w = _rng(7).standard_normal((3, 3, 4, 6)).astype(np.float32)  # HWIO

    def body(bb, x):
        return relax.op.nn.conv2d(x, const(w), padding=1, data_layout="NHWC", kernel_layout="HWIO")

    g = one_function(body, [("x", (1, 5, 5, 4), "float32")])
    out, info = offloaded(g, LIBRARY)
    assert ops_of(out) == ["relax.nn.conv2d"] and info["library_calls"] == 0
    assert list(info["left_to_tvm"].values()) == ["data_layout NHWC; the library takes NCHW"]
    x = _rng(8).standard_normal((1, 5, 5, 4)).astype(np.float32)
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w).permute(3, 2, 0, 1), padding=1
    )
    (got,) = run(out, x)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=ATOL)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_matmul_of_constants_alone_is_left_to_constant_folding():
    def body(bb, x):
        c = bb.emit(relax.op.matmul(const(W84.T.copy()), const(W84)))  # (4, 4), constants
        return relax.op.add(x, c)

    g = one_function(body, [("x", (4, 4), "float32")])
    out, info = offloaded(g, LIBRARY)
    assert not any(ops.is_library_call(n.op) for n in out.nodes)
    assert list(info["left_to_tvm"].values()) == ["computed from constants alone (TVM folds it)"]
    x = _rng(16).standard_normal((4, 4)).astype(np.float32)
    (got,) = run(out, x)
    np.testing.assert_allclose(got, x + W84.T @ W84, rtol=0, atol=1e-4)


def test_negative_batchnorm_after_a_conv_read_twice_is_not_folded():
    w = _rng(17).standard_normal((4, 2, 1, 1)).astype(np.float32)
    stats = [const(_rng(18 + i).uniform(0.5, 1.5, 4).astype(np.float32)) for i in range(4)]

    def body(bb, x):
        conv = bb.emit(relax.op.nn.conv2d(x, const(w)))
        bn = bb.emit(relax.op.nn.batch_norm(conv, *stats, axis=1))
        return relax.op.add(bb.emit(relax.TupleGetItem(bn, 0)), conv)

    g = one_function(body, [("x", (1, 2, 3, 3), "float32")])
    result = FoldBatchNorm().run(g, PassContext())
    assert not result.changed
    from mtcompile.passes.fold_batch_norm import why_not

    bn = next(n for n in g.nodes if n.op == "relax.nn.batch_norm")
    conv = bn.args[0].name
    assert why_not(g, bn, g.users(), g.output_names()) == f"conv %{conv} is read elsewhere too"


def _used_by_multiply(bb, x):
    mm = bb.emit(relax.op.matmul(x, const(W84)))
    biased = bb.emit(relax.op.add(mm, const(B4)))
    return relax.op.multiply(biased, mm)


def _used_as_output(bb, x):
    mm = bb.emit(relax.op.matmul(x, const(W84)))
    biased = bb.emit(relax.op.add(const(B4), mm))
    return relax.Tuple([biased, mm])


@pytest.mark.parametrize(
    "body, reference",
    [
        (_used_by_multiply, lambda x: (x @ W84 + B4) * (x @ W84)),
        (_used_as_output, lambda x: ((x @ W84 + B4), x @ W84)),
    ],
)
@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_bias_is_not_folded_into_a_matmul_used_twice(body, reference):
    g = one_function(body, [("x", (2, 8), "float32")])
    out, info = offloaded(g, LIBRARY)
    calls = ops_of(out)
    assert calls[:2] == [DENSE, "relax.add"] and DENSE_BIAS not in calls
    assert info["library_calls"] == 1 and info["biases_folded"] == 0
    got = run(out, X28)
    want = reference(X28)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g_, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g_, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(4, 1), (4, 4), (1, 4, 4)])
@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_matmul_bias_not_along_the_last_axis_is_not_folded(bias_shape):
    # x (4, 8) @ W (8, 4) -> (4, 4): a (4, 1) bias adds along rows, a (4, 4) one everywhere,
    # a (1, 4, 4) one also adds an axis; none of them is a 1-D bias of the columns.
    bias = _rng(9).standard_normal(bias_shape).astype(np.float32)

    def body(bb, x):
        mm = bb.emit(relax.op.matmul(x, const(W84)))
        return relax.op.add(mm, const(bias))

    out, _ = offloaded(one_function(body, [("x", (4, 8), "float32")]), LIBRARY)
    assert ops_of(out) == [DENSE, "relax.add"]
    x = _rng(10).standard_normal((4, 8)).astype(np.float32)
    (got,) = run(out, x)
    np.testing.assert_allclose(got, x @ W84 + bias, rtol=0, atol=1e-5)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_bias_of_a_batched_weight_is_not_folded():
    # addmm takes a 2-D weight: a (2, 8, 4) weight keeps its bias an add after the call
    w = _rng(19).standard_normal((2, 8, 4)).astype(np.float32)

    def body(bb, x):
        mm = bb.emit(relax.op.matmul(x, const(w)))
        return relax.op.add(mm, const(B4))

    out, _ = offloaded(one_function(body, [("x", (2, 3, 8), "float32")]), LIBRARY)
    assert ops_of(out) == [MATMUL, "relax.add"]
    x = _rng(20).standard_normal((2, 3, 8)).astype(np.float32)
    (got,) = run(out, x)
    np.testing.assert_allclose(got, x @ w + B4, rtol=0, atol=1e-5)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_conv_bias_along_the_width_is_not_folded():
    # 4 channels and width 4: a (4,) bias adds along the width, not the channels.
    w = _rng(11).standard_normal((4, 2, 3, 3)).astype(np.float32)
    bias = np.arange(4, dtype=np.float32)

    def body(bb, x):
        conv = bb.emit(relax.op.nn.conv2d(x, const(w)))
        return relax.op.add(conv, const(bias))

    out, _ = offloaded(one_function(body, [("x", (1, 2, 8, 6), "float32")]), LIBRARY)
    assert ops_of(out) == [CONV2D, "relax.add"]
    x = _rng(12).standard_normal((1, 2, 8, 6)).astype(np.float32)
    (got,) = run(out, x)
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy() + bias
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_channel_bias_of_a_conv_is_folded():
    w = _rng(13).standard_normal((4, 2, 3, 3)).astype(np.float32)
    bias = np.arange(4, dtype=np.float32).reshape(4, 1, 1)

    def body(bb, x):
        conv = bb.emit(relax.op.nn.conv2d(x, const(w)))
        return relax.op.add(conv, const(bias))

    out, _ = offloaded(one_function(body, [("x", (1, 2, 8, 6), "float32")]), LIBRARY)
    assert ops_of(out) == [CONV2D_BIAS]
    (call,) = [n for n in out.nodes if sym_of(n) == CONV2D_BIAS]
    assert out.constants[call.args[2].key].shape == (4,)
    x = _rng(14).standard_normal((1, 2, 8, 6)).astype(np.float32)
    (got,) = run(out, x)
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias.reshape(4))
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_sum_of_two_matmuls_is_not_a_bias():
    def body(bb, x):
        a = bb.emit(relax.op.matmul(x, const(W84)))
        b = bb.emit(relax.op.matmul(x, const(2 * W84)))
        return relax.op.add(a, b)

    out, info = offloaded(one_function(body, [("x", (2, 8), "float32")]), LIBRARY)
    assert ops_of(out) == [DENSE, DENSE, "relax.add"] and info["library_calls"] == 2
    (got,) = run(out, X28)
    np.testing.assert_allclose(got, 3 * (X28 @ W84), rtol=0, atol=1e-5)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_a_per_channel_value_computed_at_run_time_is_not_a_bias():
    def body(bb, x, v):
        mm = bb.emit(relax.op.matmul(x, const(W84)))
        return relax.op.add(mm, bb.emit(relax.op.nn.relu(v)))  # (4,): one per column

    g = one_function(body, [("x", (2, 8), "float32"), ("v", (4,), "float32")])
    out, info = offloaded(g, LIBRARY)
    assert ops_of(out) == [DENSE, "relax.nn.relu", "relax.add"]
    assert info["biases_folded"] == 0
    (got,) = run(out, X28, B4)
    np.testing.assert_allclose(got, X28 @ W84 + np.maximum(B4, 0), rtol=0, atol=1e-5)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_without_the_pass_heavy_ops_stay_tvm_ops():
    lin = nn.Linear(8, 4).eval()
    bundle = mtcompile.compile(
        [mtcompile.Tenant("t", lin, example_inputs=(torch.from_numpy(X28),))],
        passes=[],
        kernels="native",
    )
    assert bundle.compile_report["build"]["library_calls"] == 0
    with torch.no_grad():
        np.testing.assert_allclose(
            bundle.run("t", X28)[0], lin(torch.from_numpy(X28)).numpy(), rtol=0, atol=1e-5
        )


# --------------------------------------------------------------------------- epilogues

X48 = _rng(5).standard_normal((4, 8)).astype(np.float32)
R44 = _rng(6).standard_normal((4, 4)).astype(np.float32)


def _linear(bb, x):
    return bb.emit(relax.op.add(bb.emit(relax.op.matmul(x, const(W84))), const(B4)))


def _gelu(v):
    return np.asarray(torch.nn.functional.gelu(torch.from_numpy(v)))


@pytest.mark.parametrize(
    "body, op, reference",
    [
        (
            lambda bb, x, r: relax.op.nn.relu(_linear(bb, x)),
            "matmul_bias_relu",
            lambda x, r: np.maximum(x @ W84 + B4, 0),
        ),
        (
            lambda bb, x, r: relax.op.nn.gelu(_linear(bb, x)),
            "matmul_bias_gelu",
            lambda x, r: _gelu(x @ W84 + B4),
        ),
        (
            lambda bb, x, r: relax.op.add(r, _linear(bb, x)),
            "matmul_bias_add",
            lambda x, r: x @ W84 + B4 + r,
        ),
        (
            lambda bb, x, r: relax.op.nn.relu(bb.emit(relax.op.add(_linear(bb, x), r))),
            "matmul_bias_add_relu",
            lambda x, r: np.maximum(x @ W84 + B4 + r, 0),
        ),
    ],
)
@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_activation_and_residual_after_a_native_bias_call_join_it(body, op, reference):
    g = one_function(body, [("x", (4, 8), "float32"), ("r", (4, 4), "float32")])
    out, info = offloaded(g, LIBRARY)
    assert ops_of(out) == [f"mtcompile.native.{op.replace('matmul', 'dense_packed')}"]
    assert info["epilogues_folded"] == 1
    (call,) = [n for n in out.nodes if ops.is_library_call(n.op)]
    assert call.name == out.tenants["main"].outputs[0].name  # named as the node it replaced
    if "add" in op:  # the residual is the argument after the bias
        assert call.args[3] == Ref("main.r")
    (got,) = run(out, X48, R44)
    np.testing.assert_allclose(got, reference(X48, R44), rtol=0, atol=1e-5)


class _Block(nn.Module):
    """A ResNet basic block of `c` channels: conv-bn-relu, conv-bn + shortcut, relu."""

    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)


@pytest.mark.parametrize("c, size, form", [(4, 8, "conv2d"), (16, 32, "conv2d_winograd")])
@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_resnet_block_convs_take_their_relu_and_shortcut(c, size, form):
    """A basic block: conv-bn-relu, conv-bn + shortcut, relu -> two conv calls, no TVM op; at
    16 channels and 32x32 they take Winograd's F(2x2, 3x3) (their weights transformed here,
    the epilogues kept; `conv_forms=False` keeps the direct form). Both match PyTorch."""
    torch.manual_seed(0)
    block = _Block(c).eval()
    x = torch.randn(2, c, size, size)
    out, info = offloaded(lifted(block, x), LIBRARY)
    assert ops_of(out) == [
        f"mtcompile.native.{form}_bias_relu",
        f"mtcompile.native.{form}_bias_add_relu",
    ]
    assert info["epilogues_folded"] == 2
    assert info["winograd_convs"] == (2 if form == "conv2d_winograd" else 0)
    (got,) = run(out, x.numpy(), tenant="t")
    with torch.no_grad():
        np.testing.assert_allclose(got, block(x).numpy(), rtol=0, atol=1e-5)
    if form == "conv2d_winograd":
        call = next(n for n in out.nodes if ops.is_library_call(n.op))
        assert out.constants[call.args[1].key].shape == (16, c, c)  # [16 positions, O, C]
        direct, info = offloaded(lifted(block, x), LIBRARY, conv_forms=False)
        assert ops_of(direct) == [
            "mtcompile.native.conv2d_bias_relu",
            "mtcompile.native.conv2d_bias_add_relu",
        ]
        assert info["winograd_convs"] == 0


@pytest.mark.parametrize(
    "x, w, strides, groups, why",
    [
        ((1, 16, 14, 14), (16, 16, 3, 3), 1, 1, "7 tiles of a row fill 7 of 16 lanes"),
        ((1, 16, 32, 32), (16, 16, 3, 3), 2, 1, "stride 2"),
        ((1, 8, 32, 32), (16, 8, 3, 3), 1, 1, "8 input channels"),
        ((1, 16, 32, 32), (16, 8, 3, 3), 1, 2, "groups"),
        ((1, 16, 32, 32), (16, 16, 5, 5), 1, 1, "a 5x5 kernel"),
    ],
)
def test_negative_convs_where_winograd_does_not_pay_stay_direct(x, w, strides, groups, why):
    wt = _rng(5).standard_normal(w).astype(np.float32)

    def body(bb, v):
        k = w[2] // 2
        return relax.op.nn.conv2d(v, const(wt), strides=strides, padding=k, groups=groups)

    out, info = offloaded(one_function(body, [("x", x, "float32")]), LIBRARY)
    assert ops_of(out) == [CONV2D] and info["winograd_convs"] == 0, why


@pytest.mark.parametrize("kernel", [(16, 16), (8, 14)])
def test_patch_embedding_runs_as_a_dense_layer_on_its_patches(kernel):
    """A conv whose stride is its kernel (a ViT's patch embedding) -> the patch variant on the
    weight packed as a dense layer's, with its bias; it matches PyTorch (numerics through the
    whole build, with the leftover rows and columns a stride that does not divide drops)."""
    conv = nn.Conv2d(3, 24, kernel, stride=kernel).eval()
    x = torch.randn(2, 3, 50, 46)
    out, info = offloaded(lifted(conv, x), LIBRARY)
    assert ops_of(out) == [sym("conv2d", "patch", bias=True)] and info["patch_convs"] == 1
    call = next(n for n in out.nodes if ops.is_library_call(n.op))
    k = 3 * kernel[0] * kernel[1]
    assert out.constants[call.args[1].key].shape == (2, k, 16)  # 24 columns: 2 panels of 16
    small, info = offloaded(lifted(nn.Conv2d(3, 24, 4, stride=4).eval(), x), LIBRARY)
    assert ops_of(small) == [CONV2D_BIAS] and info["patch_convs"] == 0  # a 4x4 stem: direct
    (got,) = run(out, x.numpy(), tenant="t")
    with torch.no_grad():
        np.testing.assert_allclose(got, conv(x).numpy(), rtol=0, atol=1e-5)


def _relu_read_twice(bb, x, r):
    mm = _linear(bb, x)
    return relax.op.add(bb.emit(relax.op.nn.relu(mm)), mm)


def _relu_of_an_output(bb, x, r):
    mm = _linear(bb, x)
    return relax.Tuple([bb.emit(relax.op.nn.relu(mm)), mm])


def _broadcast_residual(bb, x, r):
    return relax.op.add(_linear(bb, x), bb.emit(relax.op.sum(r, axis=[0], keepdims=True)))


@pytest.mark.parametrize(
    "body, reference",
    [
        (_relu_read_twice, lambda x, r: (np.maximum(x @ W84 + B4, 0) + (x @ W84 + B4),)),
        (_relu_of_an_output, lambda x, r: (np.maximum(x @ W84 + B4, 0), x @ W84 + B4)),
        (_broadcast_residual, lambda x, r: (x @ W84 + B4 + r.sum(0, keepdims=True),)),
    ],
)
@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_epilogue_not_folded_where_the_call_is_read_elsewhere_or_shapes_differ(
    body, reference
):
    g = one_function(body, [("x", (4, 8), "float32"), ("r", (4, 4), "float32")])
    out, info = offloaded(g, LIBRARY)
    assert info["epilogues_folded"] == 0 and DENSE_BIAS in ops_of(out)
    got = run(out, X48, R44)
    for g_, w in zip(got, reference(X48, R44), strict=True):
        np.testing.assert_allclose(g_, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("providers, options", [(TORCH, {}), (LIBRARY, {"epilogues": False})])
@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_negative_epilogues_only_for_native_kernels_and_when_asked(providers, options):
    g = one_function(
        lambda bb, x, r: relax.op.nn.relu(_linear(bb, x)),
        [("x", (4, 8), "float32"), ("r", (4, 4), "float32")],
    )
    ctx = PassContext("llvm", providers)
    passes = build_pipeline(
        ["fold-batch-norm", "offload-library"], {"offload-library": options} if options else None
    )
    out, records = run_passes(g, passes, ctx)
    assert records[-1].info["epilogues_folded"] == 0 and ops_of(out)[-1] == "relax.nn.relu"
    (got,) = run(out, X48, R44)
    np.testing.assert_allclose(got, np.maximum(X48 @ W84 + B4, 0), rtol=0, atol=1e-5)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_linear_on_a_3d_input_takes_gelu_and_residual_through_its_reshape():
    """torch.export gives Linear on (2, 3, 8) as reshape, addmm, reshape: the GELU and the
    residual add after the reshape still join the call, which reads its input as a view."""

    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.down(nn.functional.gelu(self.up(x)))

    torch.manual_seed(0)
    ffn, x = FFN().eval(), torch.randn(2, 3, 8)
    out, info = offloaded(lifted(ffn, x), LIBRARY)
    calls = [op for op in ops_of(out) if op.startswith("mtcompile.")]
    assert calls == [DENSE_BIAS + "_gelu", DENSE_BIAS + "_add"]
    assert info["epilogues_folded"] == 2 and "relax.add" not in ops_of(out)
    (got,) = run(out, x.numpy(), tenant="t")
    with torch.no_grad():
        np.testing.assert_allclose(got, ffn(x).numpy(), rtol=0, atol=1e-5)


class _Rows(nn.Module):
    """Layer norm, then a softmax over the last axis and one over another."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)

    def forward(self, x):
        y = self.ln(x)
        return torch.softmax(y, dim=-1), torch.softmax(y, dim=1)


@pytest.mark.slow  # builds its graph through TVM to compare numerics
def test_softmax_and_layer_norm_over_the_last_axis_become_native_row_calls():
    torch.manual_seed(0)
    model, x = _Rows().eval(), 3 * torch.randn(2, 5, 16)
    with torch.no_grad():
        model.ln.weight.mul_(2).add_(0.5)
        want = [w.numpy() for w in model(x)]
    out, info = offloaded(lifted(model, x), LIBRARY)
    assert ops_of(out) == [
        sym("layer_norm"),
        sym("softmax"),
        "relax.nn.softmax",
    ]  # the softmax over axis 1 stays TVM's
    assert info["row_calls"] == 2
    ln = next(n for n in out.nodes if sym_of(n) == sym("layer_norm"))
    np.testing.assert_array_equal(out.constants[ln.args[3].key], np.float32([1e-5]))  # epsilon
    for got, w in zip(run(out, x.numpy(), tenant="t"), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=0, atol=1e-5)


def test_a_scale_and_shift_per_slice_after_a_layer_norm_join_the_native_call():
    """layer_norm(x) * G + B with G, B one row per slice of the first axis (fuse-horizontal's
    stacked tenants) -> one native layer norm call taking them, named as the add."""
    rng = _rng(8)
    scale, shift = (rng.standard_normal((2, 1, 8)).astype(np.float32) for _ in range(2))
    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)

    def body(bb, x):
        ln = bb.emit(relax.op.nn.layer_norm(x, const(ones), const(zeros), axes=[-1]))
        return relax.op.add(bb.emit(relax.op.multiply(ln, const(scale))), const(shift))

    g = one_function(body, [("x", (2, 3, 8), "float32")])
    out, _ = offloaded(g, LIBRARY)
    assert ops_of(out) == [sym("layer_norm")]
    (ln,) = [n for n in out.nodes if ops.is_library_call(n.op)]
    np.testing.assert_array_equal(out.constants[ln.args[1].key], scale.reshape(-1))
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    (got,) = run(out, x)
    want = torch.nn.functional.layer_norm(torch.from_numpy(x), (8,)).numpy() * scale + shift
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "providers, options, target",
    [
        (TVM, {}, "llvm"),
        (TORCH, {}, "llvm"),
        (LIBRARY, {"rows": False}, "llvm"),
        (LIBRARY, {}, "cuda"),
    ],
)
def test_negative_row_calls_only_next_to_native_matmuls_on_llvm_and_when_asked(
    providers, options, target
):
    model, x = _Rows().eval(), torch.randn(2, 5, 16)
    passes = build_pipeline(["offload-library"], {"offload-library": options} if options else None)
    out, records = run_passes(lifted(model, x), passes, PassContext(target, providers))
    assert records[-1].info.get("row_calls", 0) == 0
    assert not any(
        n.attrs.kernel in ("softmax", "layer_norm") for n in out.nodes if ops.is_library_call(n.op)
    )
