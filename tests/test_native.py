"""Native kernels (mtcompile.native): numerics against numpy/torch, clear errors, the VM path,
TVM's thread pool, and a bundle that links them in and runs with torch blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import tvm_ffi
from conftest import run_child

import mtcompile.native as native

RTOL = 1e-4


def _sym(kernel: str, variant: str = "", bias: bool = False, epilogue: str = "") -> str:
    """The symbol of a native kernel form the table lists."""
    return native.table.find("native", kernel, variant, bias, epilogue).symbol


MATMUL, MATMUL_BIAS = _sym("matmul"), _sym("matmul", bias=True)
CONV2D, CONV2D_BIAS = _sym("conv2d"), _sym("conv2d", bias=True)
DENSE_PACKED_BIAS = _sym("matmul", "packed", bias=True)


@pytest.fixture(scope="module")
def kernels():
    native.register()
    return {
        n: tvm_ffi.get_global_func(f"mtcompile.native.{n}")
        for n in (
            "matmul",
            "matmul_bias",
            "conv2d",
            "conv2d_bias",
            "dense_packed",
            "dense_packed_bias",
        )
    }


def _t(a: np.ndarray):
    return tvm_ffi.from_dlpack(a)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(got.astype(np.float64) - ref).max()) / scale
    assert err <= RTOL, f"relative error {err:.2e} > {RTOL}"


def _rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


MATMUL_SHAPES = [
    ((64, 256), (256, 1024)),  # rows split over the pool
    ((3, 40), (40, 700)),  # few rows: columns split
    ((2, 5, 64, 48), (48, 96)),  # batch folded into the rows (weight shared)
    ((4, 64, 64), (4, 64, 64)),  # batched
    ((2, 1, 33, 17), (3, 17, 65)),  # broadcast batch dims
    ((1, 17, 9), (6, 9, 300)),  # a broadcast over b's batch
    ((17,), (17, 5)),  # 1-D left operand
    ((2, 6, 17), (17,)),  # 1-D right operand
    ((0, 8), (8, 4)),  # empty
]


@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES)
def test_matmul_matches_numpy(kernels, sa, sb):
    rng = np.random.default_rng(len(sa) * 100 + sb[-1])
    a, b = _rand(rng, sa), _rand(rng, sb)
    ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
    out = np.full(ref.shape, np.nan, np.float32)
    kernels["matmul"](_t(a), _t(b), _t(out))
    assert out.shape == ref.shape
    if out.size:
        _close(out, ref)


@pytest.mark.parametrize("sa,n", [((64, 256), 256), ((2, 3, 50, 31), 129), ((5, 8), 3)])
def test_matmul_bias_matches_numpy(kernels, sa, n):
    rng = np.random.default_rng(n)
    a, w, bias = _rand(rng, sa), _rand(rng, (sa[-1], n)), _rand(rng, (n,))
    out = np.full(sa[:-1] + (n,), np.nan, np.float32)
    kernels["matmul_bias"](_t(a), _t(w), _t(bias), _t(out))
    _close(out, a.astype(np.float64) @ w + bias)


# x shape, out channels, kernel, stride, padding (top, left, bottom, right), dilation, groups
CONVS = [
    ((1, 3, 64, 64), 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((1, 32, 32, 32), 64, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ((2, 64, 16, 16), 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((2, 64, 16, 16), 128, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # 1x1: no im2col
    ((1, 16, 15, 13), 8, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),  # strided 1x1
    ((1, 8, 17, 19), 12, (3, 5), (2, 1), (0, 2, 1, 1), (1, 1), 1),  # asymmetric padding
    ((1, 8, 20, 20), 8, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),  # dilation
    ((1, 8, 21, 18), 6, (3, 3), (3, 2), (1, 0, 2, 3), (2, 1), 2),  # all at once, groups 2
    ((2, 64, 16, 16), 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),  # grouped
    ((1, 64, 32, 32), 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 64),  # depthwise
    ((1, 16, 19, 17), 32, (5, 3), (2, 3), (2, 0, 1, 2), (1, 2), 16),  # depthwise x2, odd
    ((0, 4, 5, 5), 4, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # empty batch
    # the AVX2 direct form (16 output columns per tile; outputs at least 12 wide):
    ((1, 8, 30, 45), 13, (3, 5), (1, 3), (0, 2, 1, 1), (1, 1), 1),  # stride 3, 13 channels
    ((2, 12, 28, 28), 10, (3, 3), (2, 2), (1, 1, 0, 0), (2, 2), 2),  # dilated, strided, grouped
    ((1, 16, 14, 14), 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # a partial tile per row
    ((1, 4, 9, 50), 6, (1, 1), (1, 2), (0, 1, 0, 0), (1, 1), 1),  # 1x1, stride 2, odd pad
    # balanced strips of output channels (AVX-512: 40 -> 14, 13, 13; 17 -> 9, 8; 33 -> 11 x 3)
    ((1, 16, 20, 20), 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((1, 8, 16, 18), 17, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((1, 24, 16, 16), 66, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2),
]


def _conv_ref(x, w, bias, stride, pad, dil, groups):
    t = torch.nn.functional.pad(torch.from_numpy(x).double(), (pad[1], pad[3], pad[0], pad[2]))
    b = None if bias is None else torch.from_numpy(bias).double()
    return torch.nn.functional.conv2d(
        t, torch.from_numpy(w).double(), b, stride, 0, dil, groups
    ).numpy()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("xs,oc,k,stride,pad,dil,groups", CONVS)
def test_conv2d_matches_torch(kernels, xs, oc, k, stride, pad, dil, groups, with_bias):
    rng = np.random.default_rng(oc + groups)
    x, w = _rand(rng, xs), _rand(rng, (oc, xs[1] // groups, *k))
    bias = _rand(rng, (oc,)) if with_bias else None
    ref = _conv_ref(x, w, bias, stride, pad, dil, groups)
    out = np.full(ref.shape, np.nan, np.float32)
    params = tvm_ffi.Shape([*stride, *pad, *dil, groups])
    if with_bias:
        kernels["conv2d_bias"](_t(x), _t(w), _t(bias), params, _t(out))
    else:
        kernels["conv2d"](_t(x), _t(w), params, _t(out))
    if ref.size:
        _close(out, ref)


# x shape, out channels, padding (top, left, bottom, right) of 3x3 stride-1 convs for the
# Winograd form: bands, partial tiles (odd sizes), a partial vector of tiles, unpadded, wide
# and asymmetric padding, a batch, channels that split into uneven strips
WINOGRAD_CONVS = [
    ((1, 32, 64, 64), 32, (1, 1, 1, 1)),
    ((2, 16, 9, 13), 24, (1, 1, 1, 1)),
    ((1, 16, 7, 5), 17, (0, 0, 0, 0)),
    ((1, 20, 15, 16), 33, (0, 1, 2, 1)),
    ((3, 64, 14, 14), 40, (2, 2, 2, 2)),
    ((1, 16, 33, 40), 16, (1, 1, 1, 1)),
    ((1, 17, 3, 3), 16, (1, 1, 1, 1)),
]

WINOGRAD_CHECK = """
import numpy as np, torch, tvm_ffi
import mtcompile.native as native
native.register()
t = tvm_ffi.from_dlpack
rng = np.random.default_rng(0)
r = lambda *s: rng.standard_normal(s).astype(np.float32)
worst = 0.0
for xs, oc, pad in CASES:
    x, w, b, res = r(*xs), r(oc, xs[1], 3, 3), r(oc), None
    ref = torch.nn.functional.pad(torch.from_numpy(x).double(), (pad[1], pad[3], pad[0], pad[2]))
    ref = torch.nn.functional.conv2d(ref, torch.from_numpy(w).double()).numpy()
    res = r(*ref.shape)
    params = tvm_ffi.Shape([1, 1, *pad, 1, 1, 1])
    u = native.winograd_weights(w)
    for form, args, want in [
        ("", [], ref),
        ("_bias", [b], ref + b.reshape(-1, 1, 1)),
        ("_bias_add_relu", [b, res], np.maximum(ref + b.reshape(-1, 1, 1) + res, 0)),
    ]:
        out = np.full(ref.shape, np.nan, np.float32)
        tvm_ffi.get_global_func("mtcompile.native.conv2d_winograd" + form)(
            t(x), t(u), *map(t, args), params, t(out))
        worst = max(worst, float(np.abs(out - want).max() / np.abs(want).max()))
print(worst)
"""


@pytest.mark.parametrize(
    "isa",
    [
        "",
        pytest.param("MTCOMPILE_NATIVE_AVX2", marks=pytest.mark.slow),
        pytest.param("MTCOMPILE_NATIVE_GENERIC", marks=pytest.mark.slow),
    ],
)
def test_winograd_conv_matches_torch(isa):
    """conv2d[winograd] on the transformed weights (`native.winograd_weights`): plain, with a
    bias, with a residual and ReLU, against float64 torch, on each path the kernel takes (the
    AVX-512 tiles, the AVX2 transforms with the BLAS, the generic ones)."""
    out = run_child(f"CASES = {WINOGRAD_CONVS!r}\n" + WINOGRAD_CHECK, isa=isa)
    assert float(out.split()[-1]) <= RTOL


def test_patch_conv_refuses_padding_and_a_wrong_packing():
    native.register()
    conv = tvm_ffi.get_global_func("mtcompile.native.conv2d_patch")
    x, out = _f32(1, 3, 32, 32), _f32(1, 24, 2, 2)
    wp = native.pack_dense(_f32(24, 3 * 16 * 16).T)
    with pytest.raises(ValueError, match=r"no padding.*found params \[16, 16, 1, 0, 0, 0"):
        conv(_t(x), _t(wp), tvm_ffi.Shape([16, 16, 1, 0, 0, 0, 1, 1, 1]), _t(out))
    with pytest.raises(
        ValueError, match=r"packed weight has shape \[2, 768, 16\], expected \[2, 192"
    ):
        conv(_t(x), _t(wp), tvm_ffi.Shape([8, 8, 0, 0, 0, 0, 1, 1, 1]), _t(_f32(1, 24, 4, 4)))


def test_winograd_weights_are_g_w_gt():
    """U[4i + j, o, c] = (G w[o, c] G^T)[i, j] with Winograd's F(2x2, 3x3) G."""
    w = np.random.default_rng(1).standard_normal((3, 2, 3, 3)).astype(np.float32)
    u = native.winograd_weights(w)
    assert u.shape == (16, 3, 2) and u.dtype == np.float32 and u.flags.c_contiguous
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    np.testing.assert_allclose(u[:, 2, 1].reshape(4, 4), g @ w[2, 1] @ g.T, rtol=1e-6)
    assert u[0, 1, 0] == w[1, 0, 0, 0] and u[15, 1, 0] == w[1, 0, 2, 2]  # the corners


def test_winograd_conv_refuses_what_it_does_not_compute():
    native.register()
    conv = tvm_ffi.get_global_func("mtcompile.native.conv2d_winograd")
    x, w = _f32(1, 16, 8, 8), _f32(16, 16, 3, 3)
    out = np.zeros((1, 16, 8, 8), np.float32)
    ok = tvm_ffi.Shape([1, 1, 1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"Winograd weight has shape \[16, 16, 8\], expected"):
        conv(_t(x), _t(native.winograd_weights(w)[:, :, :8].copy()), ok, _t(out))
    strided = tvm_ffi.Shape([2, 2, 1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(
        ValueError, match="takes stride 1, dilation 1 and one group, found strides 2"
    ):
        conv(_t(x), _t(native.winograd_weights(w)), strided, _t(out))
    with pytest.raises(
        ValueError, match=r"out has shape \[1, 16, 8, 8\], expected \[1, 16, 6, 6\]"
    ):
        conv(
            _t(x),
            _t(native.winograd_weights(w)),
            tvm_ffi.Shape([1] * 2 + [0] * 4 + [1] * 3),
            _t(out),
        )


def test_pack_dense_layout():
    w = np.arange(3 * 20, dtype=np.float32).reshape(3, 20)
    p = native.pack_dense(w)
    assert p.shape == (2, 3, 16) and p.flags.c_contiguous
    np.testing.assert_array_equal(p[0], w[:, :16])
    np.testing.assert_array_equal(p[1, :, :4], w[:, 16:])
    assert not p[1, :, 4:].any()  # columns past N are zero


# a shape, out features: 6-row tiles and a partial one, a partial 16-column panel, rank 1 and 3,
# one row (a GEMV), rows over several row blocks (K 256: 126 rows per block)
DENSE = [
    ((64, 256), 256),
    ((37, 192), 200),
    ((2, 5, 48), 33),
    ((17,), 5),
    ((1, 512), 2048),
    ((300, 256), 40),
    ((7, 0), 9),
]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("sa,n", DENSE)
def test_dense_packed_matches_numpy(kernels, sa, n, with_bias):
    rng = np.random.default_rng(n)
    a, w, bias = _rand(rng, sa), _rand(rng, (sa[-1], n)), _rand(rng, (n,))
    ref = a.astype(np.float64) @ w + (bias if with_bias else 0)
    out = np.full(ref.shape, np.nan, np.float32)
    wp = native.pack_dense(w)
    if with_bias:
        kernels["dense_packed_bias"](_t(a), _t(wp), _t(bias), _t(out))
    else:
        kernels["dense_packed"](_t(a), _t(wp), _t(out))
    if sa[-1] == 0:
        np.testing.assert_array_equal(out, ref.astype(np.float32))
    else:
        _close(out, ref)


def _act(v: np.ndarray, act: str) -> np.ndarray:
    t = torch.from_numpy(v)
    return {"": t, "relu": torch.relu(t), "gelu": torch.nn.functional.gelu(t)}[act].numpy()


# (kernel, its arguments before the bias, the float64 reference without bias): direct conv,
# im2col conv (narrow output), depthwise, 1x1; BLAS matmul; packed dense with a partial tile
def _epilogue_cases(rng):
    def conv(xs, ws, stride, pad, groups=1):
        x, w = _rand(rng, xs), _rand(rng, ws)
        params = tvm_ffi.Shape([stride, stride, *[pad] * 4, 1, 1, groups])
        ref = _conv_ref(x, w, None, (stride,) * 2, (pad,) * 4, (1, 1), groups)
        return "conv2d", [_t(x), _t(w)], [params], ref

    a, w = _rand(rng, (37, 70)), _rand(rng, (70, 45))
    return [
        conv((1, 16, 32, 32), (16, 16, 3, 3), 1, 1),
        conv((2, 8, 9, 9), (12, 8, 3, 3), 2, 1),
        conv((1, 6, 10, 10), (6, 1, 3, 3), 1, 1, groups=6),
        conv((1, 3, 20, 20), (4, 3, 1, 1), 1, 0),
        ("matmul", [_t(a), _t(w)], [], a.astype(np.float64) @ w),
        ("dense_packed", [_t(a), _t(native.pack_dense(w))], [], a.astype(np.float64) @ w),
    ]


@pytest.mark.parametrize("epilogue", ["relu", "gelu", "add", "add_relu"])
def test_epilogue_kernels_match_torch(epilogue):
    """<kernel>_bias_<epilogue>: act(kernel + bias (+ residual)) on every path a kernel takes,
    against torch's relu / exact (erf) gelu."""
    native.register()
    rng = np.random.default_rng(len(epilogue))
    for kernel, head, tail, ref in _epilogue_cases(rng):
        bias = _rand(rng, (ref.shape[1 if kernel == "conv2d" else -1],))
        ref = ref + (bias.reshape(-1, 1, 1) if kernel == "conv2d" else bias)
        args = [*head, _t(bias)]
        if epilogue.startswith("add"):
            res = _rand(rng, ref.shape)
            ref, args = ref + res, [*args, _t(res)]
        ref = _act(ref, epilogue.removeprefix("add").strip("_"))
        out = np.full(ref.shape, np.nan, np.float32)
        tvm_ffi.get_global_func(f"mtcompile.native.{kernel}_bias_{epilogue}")(*args, *tail, _t(out))
        _close(out, ref)


def test_epilogue_keeps_nan_and_refuses_a_residual_that_overlaps_out():
    native.register()
    relu = tvm_ffi.get_global_func("mtcompile.native.dense_packed_bias_relu")
    add = tvm_ffi.get_global_func("mtcompile.native.dense_packed_bias_add")
    a, w, bias = _f32(6, 8), _f32(8, 16), _f32(16)
    a[2, 3] = np.nan
    out = np.zeros((6, 16), np.float32)
    relu(_t(a), _t(native.pack_dense(w)), _t(bias), _t(out))
    assert np.isnan(out[2]).all() and not np.isnan(np.delete(out, 2, 0)).any()
    with pytest.raises(ValueError, match="dense_packed_bias_add: residual and out overlap"):
        add(_t(a), _t(native.pack_dense(w)), _t(bias), _t(out), _t(out))
    with pytest.raises(ValueError, match=r"residual has shape \[6, 8\], expected out's"):
        add(_t(a), _t(native.pack_dense(w)), _t(bias), _t(a), _t(out))


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (3, 37), (2, 5, 256), (7, 1)])
def test_softmax_and_layer_norm_rows_match_torch(shape):
    """Rows of 8-lane vectors and a tail; masked (-inf) scores; a NaN gives a NaN row."""
    native.register()
    softmax = tvm_ffi.get_global_func("mtcompile.native.softmax")
    layer_norm = tvm_ffi.get_global_func("mtcompile.native.layer_norm")
    rng = np.random.default_rng(shape[-1])
    x = 10 * _rand(rng, shape)
    x.reshape(-1, shape[-1])[0, : shape[-1] - 1] = -np.inf  # one row masked but its last
    if x.size > shape[-1]:
        x.reshape(-1, shape[-1])[1, 0] = np.nan
    out = np.empty_like(x)
    softmax(_t(x), _t(out))
    want = torch.softmax(torch.from_numpy(x).double(), -1).numpy()
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)  # NaN where torch has NaN
    x, g, b = 3 * _rand(rng, shape) + 1, _rand(rng, shape[-1:]), _rand(rng, shape[-1:])
    layer_norm(_t(x), _t(g), _t(b), _t(np.float32([1e-5])), _t(out))
    want = torch.nn.functional.layer_norm(
        torch.from_numpy(x).double(),
        shape[-1:],
        torch.from_numpy(g).double(),
        torch.from_numpy(b).double(),
        1e-5,
    ).numpy()
    _close(out, want)
    with pytest.raises(ValueError, match=r"layer_norm: gamma \[2\], beta"):
        layer_norm(_t(x), _t(np.ones(2, np.float32)), _t(b), _t(np.float32([1e-5])), _t(out))


def test_layer_norm_takes_a_scale_and_shift_per_slice():
    """gamma and beta of B x N values: slice b of x's first axis takes values [bN, (b+1)N)
    (fuse-horizontal's layer norm of B tenants); other sizes are refused."""
    native.register()
    layer_norm = tvm_ffi.get_global_func("mtcompile.native.layer_norm")
    rng = np.random.default_rng(7)
    x, g, b = _rand(rng, (3, 5, 24)), _rand(rng, (3, 24)), _rand(rng, (3, 24))
    out = np.empty_like(x)
    layer_norm(_t(x), _t(g.reshape(-1)), _t(b.reshape(-1)), _t(np.float32([1e-5])), _t(out))
    xd = torch.from_numpy(x).double()
    norm = torch.nn.functional.layer_norm(xd, (24,), eps=1e-5).numpy()
    _close(out, norm * g[:, None, :] + b[:, None, :])
    with pytest.raises(ValueError, match=r"expected \[24\] or \[72\] twice"):
        layer_norm(
            _t(x), _t(g[:2].reshape(-1)), _t(b[:2].reshape(-1)), _t(np.float32([1e-5])), _t(out)
        )


@pytest.mark.slow  # rebuilds the kernels for another ISA
def test_generic_paths_without_avx2():
    """MTCOMPILE_NATIVE_GENERIC=1 runs the paths a CPU without AVX2/FMA takes (im2col + BLAS
    for conv2d, per-panel BLAS for the packed dense): same numbers."""
    script = textwrap.dedent(f"""
        import numpy as np, torch, tvm_ffi
        import mtcompile.native as native
        native.register()
        conv, dense = (tvm_ffi.get_global_func("{CONV2D_BIAS}"),
                       tvm_ffi.get_global_func("{DENSE_PACKED_BIAS}"))
        rng = np.random.default_rng(0)
        r = lambda *s: rng.standard_normal(s).astype(np.float32)
        t = tvm_ffi.from_dlpack
        def close(got, ref):
            assert np.abs(got - ref).max() / np.abs(ref).max() < {RTOL}
        x, w, b = r(1, 8, 32, 32), r(16, 8, 3, 3), r(16)
        ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                         torch.from_numpy(b).double(), 2, 1).numpy()
        o = np.empty(ref.shape, np.float32)
        conv(t(x), t(w), t(b), tvm_ffi.Shape([2, 2, 1, 1, 1, 1, 1, 1, 1]), t(o))
        close(o, ref)
        a, w, b = r(37, 64), r(64, 40), r(40)
        o = np.empty((37, 40), np.float32)
        dense(t(a), t(native.pack_dense(w)), t(b), t(o))
        close(o, a.astype(np.float64) @ w + b)
        res = r(37, 40)
        tvm_ffi.get_global_func("{DENSE_PACKED_BIAS}_add_relu")(
            t(a), t(native.pack_dense(w)), t(b), t(res), t(o))
        close(o, np.maximum(a.astype(np.float64) @ w + b + res, 0))
        tvm_ffi.get_global_func("{DENSE_PACKED_BIAS}_gelu")(
            t(a), t(native.pack_dense(w)), t(b), t(o))
        close(o, torch.nn.functional.gelu(torch.from_numpy(a.astype(np.float64) @ w + b)).numpy())
        tvm_ffi.get_global_func("mtcompile.native.softmax")(t(a), t(o := np.empty_like(a)))
        close(o, torch.softmax(torch.from_numpy(a).double(), -1).numpy())
        print("ok")
    """)
    assert run_child(script, isa="MTCOMPILE_NATIVE_GENERIC").strip() == "ok"


@pytest.mark.parametrize("isa", ["avx2", "default"])
@pytest.mark.slow  # rebuilds the kernels for another ISA
def test_register_tiles_match_torch(isa):
    """The register tiles of the direct conv (4-row AVX2 strips; 12-row AVX-512 strips where
    the CPU has AVX-512F, the default there) and of the packed dense (6 rows; 14 on AVX-512,
    heights balanced) give torch's numbers: output channel counts that fill no strip, strides,
    1x1/3x3/5x5/7x7 kernels, narrow rows, a batch padded in groups of images, every row count
    1..40, ragged columns, the fused residual + ReLU, and a stack of packed weights (one per
    slice of the activations, as horizontally fused tenants have)."""
    script = textwrap.dedent(f"""
        import numpy as np, torch, tvm_ffi
        import mtcompile.native as native
        native.register()
        conv = tvm_ffi.get_global_func("{CONV2D_BIAS}")
        conv_res = tvm_ffi.get_global_func("{CONV2D_BIAS}_add_relu")
        rng = np.random.default_rng(0)
        r = lambda *s: rng.standard_normal(s).astype(np.float32)
        t = tvm_ffi.from_dlpack
        def close(got, ref):
            assert np.abs(got - ref).max() / np.abs(ref).max() < {RTOL}, np.abs(got - ref).max()
        for (n, c, h, w), oc, k, s in [((1, 32, 64, 64), 32, 3, 1), ((2, 13, 20, 37), 29, 3, 2),
                                      ((1, 3, 33, 33), 7, 7, 2), ((1, 16, 18, 18), 25, 5, 1),
                                      ((1, 24, 16, 48), 13, 1, 1), ((1, 64, 32, 32), 64, 3, 1),
                                      ((16, 16, 32, 32), 16, 3, 1)]:  # images in 4 groups
            x, wt, b = r(n, c, h, w), r(oc, c, k, k), r(oc)
            ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(),
                                             torch.from_numpy(wt).double(),
                                             torch.from_numpy(b).double(), s, k // 2)
            o = np.empty(ref.shape, np.float32)
            params = tvm_ffi.Shape([s, s] + [k // 2] * 4 + [1, 1, 1])
            conv(t(x), t(wt), t(b), params, t(o))
            close(o, ref.numpy())
            res = r(*ref.shape)
            conv_res(t(x), t(wt), t(b), t(res), params, t(o))
            close(o, torch.relu(ref + torch.from_numpy(res).double()).numpy())
        dense = tvm_ffi.get_global_func("{DENSE_PACKED_BIAS}")
        dense_res = tvm_ffi.get_global_func("{DENSE_PACKED_BIAS}_add_relu")
        for rows in range(1, 41):
            k, n = (64, 40) if rows % 2 else (37, 16)
            a, w, b = r(rows, k), r(k, n), r(n)
            ref = a.astype(np.float64) @ w + b
            o = np.empty((rows, n), np.float32)
            dense(t(a), t(native.pack_dense(w)), t(b), t(o))
            close(o, ref)
            res = r(rows, n)
            dense_res(t(a), t(native.pack_dense(w)), t(b), t(res), t(o))
            close(o, np.maximum(ref + res, 0))
        # a stack of packed weights, one per slice of a's first dimension (fused tenants)
        a, ws, b = r(3, 37, 64), [r(64, 40) for _ in range(3)], r(40)
        o = np.empty((3, 37, 40), np.float32)
        dense(t(a), t(np.stack([native.pack_dense(w) for w in ws])), t(b), t(o))
        close(o, np.stack([a[i].astype(np.float64) @ ws[i] + b for i in range(3)]))
        bs = r(3 * 40)  # one bias per weight (the fused tenants' own), flat
        dense(t(a), t(np.stack([native.pack_dense(w) for w in ws])), t(bs), t(o))
        close(o, np.stack([a[i].astype(np.float64) @ ws[i] + bs[40 * i:40 * (i + 1)]
                           for i in range(3)]))
        try:
            dense(t(a), t(np.stack([native.pack_dense(w) for w in ws])), t(bs[:80]), t(o))
        except ValueError as e:
            assert "bias has 80 values" in str(e) and "N per weight" in str(e), e
        else:
            raise AssertionError("2 biases for 3 weights were accepted")
        try:
            dense(t(a[:2]), t(np.stack([native.pack_dense(w) for w in ws])), t(b), t(o[:2]))
        except ValueError as e:
            assert "a's first dimension" in str(e), e
        else:
            raise AssertionError("2 slices of a against 3 weights were accepted")
        print("ok")
    """)
    out = run_child(script, isa="MTCOMPILE_NATIVE_AVX2" if isa == "avx2" else "")
    assert out.strip() == "ok"


@pytest.mark.slow  # times the thread pool
def test_two_threads_split_work_on_the_pool():
    """With TVM_NUM_THREADS=2 the kernels split rows / columns / pixel blocks / channels over
    the run's pool (pool.h: one worker thread appears, once) and give what numpy and torch
    give."""
    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np, torch, tvm_ffi
        import mtcompile.native as native
        native.register()
        assert tvm_ffi.get_global_func("mtcompile.native.pool_threads")(0) == 2
        mm, conv = (tvm_ffi.get_global_func("{MATMUL}"), tvm_ffi.get_global_func("{CONV2D}"))
        rng = np.random.default_rng(0)
        r = lambda *s: rng.standard_normal(s).astype(np.float32)
        def close(got, ref):
            assert np.abs(got - ref).max() / np.abs(ref).max() < {RTOL}
        mms = [(r(*sa), r(*sb)) for sa, sb in [((64, 256), (256, 1024)), ((3, 256), (256, 2048)),
                                                ((2, 64, 128), (2, 128, 256))]]
        convs = []
        for xs, oc, g in [((1, 32, 32, 32), 64, 1), ((1, 64, 32, 32), 64, 64), ((2, 64, 16, 16), 64, 4)]:
            x, w = r(*xs), r(oc, xs[1] // g, 3, 3)
            ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                             None, 1, 1, 1, g).numpy()
            convs.append((x, w, g, ref))
        before = len(os.listdir("/proc/self/task"))  # torch's threads started: the pool's next
        for a, b in mms:
            o = np.empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                         np.float32)
            mm(tvm_ffi.from_dlpack(a), tvm_ffi.from_dlpack(b), tvm_ffi.from_dlpack(o))
            close(o, a.astype(np.float64) @ b)
        for x, w, g, ref in convs:
            o = np.empty(ref.shape, np.float32)
            conv(tvm_ffi.from_dlpack(x), tvm_ffi.from_dlpack(w), tvm_ffi.Shape([1, 1, 1, 1, 1, 1, 1, 1, g]),
                 tvm_ffi.from_dlpack(o))
            close(o, ref)
        assert len(os.listdir("/proc/self/task")) == before + 1, "not one pool worker"
        print("ok")
    """)
    assert run_child(script, env={"TVM_NUM_THREADS": "2"}).strip() == "ok"


def _f32(*shape):
    return np.zeros(shape, np.float32)


BAD = [
    (
        "matmul",
        lambda: (_t(_f32(4, 8).astype(np.float64)), _t(_f32(8, 2)), _t(_f32(4, 2))),
        "a must be float32",
    ),
    ("matmul", lambda: (_t(_f32(4, 8)), _t(_f32(7, 2)), _t(_f32(4, 2))), "inner dimensions"),
    ("matmul", lambda: (_t(_f32(4, 8)), _t(_f32(8, 2)), _t(_f32(4, 3))), "out has shape"),
    (
        "matmul",
        lambda: (_t(_f32(2, 4, 8)), _t(_f32(3, 8, 2)), _t(_f32(3, 4, 2))),
        "do not broadcast",
    ),
    ("matmul", lambda: (_t(_f32(8, 4).T), _t(_f32(8, 2)), _t(_f32(4, 2))), "contiguous"),
    ("matmul", lambda: (_t(np.zeros(4, np.int32)), _t(_f32(4)), _t(_f32())), "float32"),
    (
        "matmul_bias",
        lambda: (_t(_f32(4, 8)), _t(_f32(2, 8, 2)), _t(_f32(2)), _t(_f32(4, 2))),
        "weight must have rank 2",
    ),
    (
        "matmul_bias",
        lambda: (_t(_f32(4, 8)), _t(_f32(8, 2)), _t(_f32(3)), _t(_f32(4, 2))),
        "bias has 3 values",
    ),
    (
        "conv2d",
        lambda: (
            _t(_f32(1, 4, 8)),
            _t(_f32(2, 4, 3, 3)),
            tvm_ffi.Shape([1] * 4 + [0] * 0 + [1] * 5),
            _t(_f32(1, 2, 6, 6)),
        ),
        "x must have rank 4",
    ),
    (
        "conv2d",
        lambda: (
            _t(_f32(1, 4, 8, 8)),
            _t(_f32(2, 4, 3, 3)),
            tvm_ffi.Shape([1, 1, 0]),
            _t(_f32(1, 2, 6, 6)),
        ),
        "params must be 9 values",
    ),
    (
        "conv2d",
        lambda: (
            _t(_f32(1, 4, 8, 8)),
            _t(_f32(2, 3, 3, 3)),
            tvm_ffi.Shape([1, 1, 0, 0, 0, 0, 1, 1, 1]),
            _t(_f32(1, 2, 6, 6)),
        ),
        "do not match",
    ),
    (
        "conv2d",
        lambda: (
            _t(_f32(1, 4, 8, 8)),
            _t(_f32(2, 4, 3, 3)),
            tvm_ffi.Shape([0, 1, 0, 0, 0, 0, 1, 1, 1]),
            _t(_f32(1, 2, 6, 6)),
        ),
        "bad params",
    ),
    (
        "conv2d",
        lambda: (
            _t(_f32(1, 4, 8, 8)),
            _t(_f32(2, 4, 3, 3)),
            tvm_ffi.Shape([1, 1, 0, 0, 0, 0, 1, 1, 1]),
            _t(_f32(1, 2, 5, 6)),
        ),
        "expected [1, 2, 6, 6]",
    ),
    (
        "conv2d",
        lambda: (
            _t(_f32(1, 4, 5, 5)),
            _t(_f32(2, 4, 7, 7)),
            tvm_ffi.Shape([1, 1, 0, 0, 0, 0, 1, 1, 1]),
            _t(_f32(1, 2, 1, 1)),
        ),
        "larger than the padded input",
    ),
    (
        "conv2d_bias",
        lambda: (
            _t(_f32(1, 4, 8, 8)),
            _t(_f32(2, 4, 3, 3)),
            _t(_f32(4)),
            tvm_ffi.Shape([1, 1, 0, 0, 0, 0, 1, 1, 1]),
            _t(_f32(1, 2, 6, 6)),
        ),
        "bias has 4 values",
    ),
    (
        "dense_packed",
        lambda: (_t(_f32(4, 8)), _t(_f32(1, 7, 16)), _t(_f32(4, 5))),
        "packed weight has shape [1, 7, 16], expected [1, 8, 16]",
    ),
    (
        "dense_packed",
        lambda: (_t(_f32(4, 8)), _t(_f32(8, 16)), _t(_f32(4, 5))),
        "packed weight must have rank 3",
    ),
    ("dense_packed", lambda: (_t(_f32(4, 8)), _t(_f32(1, 8, 16)), _t(_f32(3, 5))), "out has shape"),
    (
        "dense_packed_bias",
        lambda: (_t(_f32(4, 8)), _t(_f32(1, 8, 16)), _t(_f32(4)), _t(_f32(4, 5))),
        "bias has 4 values",
    ),
]


@pytest.mark.parametrize("name,args,match", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_input_is_a_clear_error(kernels, name, args, match):
    with pytest.raises((ValueError, TypeError)) as e:
        kernels[name](*args())
    assert match in str(e.value) and f"mtcompile.native.{name}" in str(e.value)


def _module():
    """A Relax module whose main calls matmul and a padded, strided conv through
    call_dps_packed, as the compiler's lowering emits them."""
    from tvm import relax

    def ty(shape):
        return relax.TensorType(shape, "float32")

    bb = relax.BlockBuilder()
    vs = [
        relax.Var(n, ty(s))
        for n, s in [
            ("a", (8, 64, 32)),
            ("b", (32, 48)),
            ("x", (1, 8, 16, 16)),
            ("w", (16, 8, 3, 3)),
            ("bias", (16,)),
        ]
    ]
    with bb.function("main", vs):
        with bb.dataflow():
            y = bb.emit(relax.op.call_dps_packed(MATMUL, relax.Tuple(vs[:2]), ty((8, 64, 48))))
            params = relax.ShapeExpr([2, 2, 1, 0, 2, 1, 1, 1, 1])
            z = bb.emit(
                relax.op.call_dps_packed(
                    CONV2D_BIAS, relax.Tuple([*vs[2:], params]), ty((1, 16, 9, 8))
                )
            )
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    return bb.get()


def _inputs():
    rng = np.random.default_rng(3)
    return [_rand(rng, s) for s in [(8, 64, 32), (32, 48), (1, 8, 16, 16), (16, 8, 3, 3), (16,)]]


@pytest.fixture(scope="module")
def executable(kernels):
    import tvm

    return tvm.compile(_module(), "llvm")


def _refs(ins):
    a, b, x, w, bias = ins
    return [a.astype(np.float64) @ b, _conv_ref(x, w, bias, (2, 2), (1, 0, 2, 1), (1, 1), 1)]


def test_vm_calls_native_kernels(executable):
    import tvm
    from tvm import relax

    ins = _inputs()
    vm = relax.VirtualMachine(executable, tvm.cpu())
    y, z = vm["main"](*[tvm.runtime.tensor(i) for i in ins])
    for got, ref in zip((y.numpy(), z.numpy()), _refs(ins), strict=True):
        _close(got, ref)


@pytest.mark.slow  # a fresh interpreter
def test_exported_bundle_runs_with_torch_blocked(executable, tmp_path):
    """The kernels linked into the exported library register when it loads: no torch, no
    tvm (compiler) import, no separate kernels library."""
    lib = tmp_path / "bundle.so"
    executable.export_library(str(lib), **native.export_options())
    ins = _inputs()
    np.savez(tmp_path / "io.npz", *ins, *_refs(ins))
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is blocked")
        sys.meta_path.insert(0, Block())
        import numpy as np, tvm_ffi
        import mtcompile.native as native
        native.preload()
        assert tvm_ffi.get_global_func("{MATMUL}", allow_missing=True) is None
        d = np.load("{tmp_path / "io.npz"}")
        ex = tvm_ffi.load_module("{lib}")
        vm = ex["vm_load_executable"]()
        vm["vm_initialization"](1, 0, 2, 1, 0, 2)
        y, z = vm["main"](*[tvm_ffi.from_dlpack(d[f"arr_{{i}}"]) for i in range(5)])
        for got, ref in ((y, d["arr_5"]), (z, d["arr_6"])):
            err = np.abs(np.from_dlpack(got) - ref).max() / np.abs(ref).max()
            assert err < {RTOL}, err
        assert "torch" not in sys.modules and "tvm" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    # here the kernels are registered already (by `register`): loading the bundle keeps them
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    y, z = vm["main"](*[tvm.runtime.tensor(i) for i in ins])
    for got, ref in zip((y.numpy(), z.numpy()), _refs(ins), strict=True):
        _close(got, ref)


# ------------------------------------------------------------------- the compiler's default

BLOCKED_CHILD = textwrap.dedent("""
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError("torch is blocked")
    sys.meta_path.insert(0, Block())
    try:
        import torch  # noqa: F401
        raise SystemExit("the blocker let torch in")
    except ImportError:
        pass
    import numpy as np
    import mtcompile
    d, io = sys.argv[1], sys.argv[2]
    b = mtcompile.load(d)
    arrays = np.load(f"{io}/in.npz")
    inputs = {n: tuple(arrays[f"{n}.{i}"] for i in range(len(b.signature(n).inputs)))
              for n in b.tenant_names}
    outs = b.run_all(inputs)
    alone = {n: b.run(n, *inputs[n]) for n in b.tenant_names}
    np.savez(f"{io}/out.npz", **{f"{n}.{i}": o for n, os_ in outs.items() for i, o in enumerate(os_)},
             **{f"alone.{n}.{i}": o for n, os_ in alone.items() for i, o in enumerate(os_)})
    print(json.dumps({"kernels": b.manifest.kernels,
                      "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
""")


@pytest.mark.slow
def test_demo_set_bundle_runs_saved_with_torch_blocked(hetero_bundle, tmp_path):
    """The heterogeneous demo set on native kernels (the CPU default): within 1e-4 of its
    source models; saved, then loaded and run in a process where ``import torch`` fails,
    with the same outputs as here."""
    from mtcompile.runtime.inputs import seeded_inputs

    b = hetero_bundle
    assert b.manifest.kernels == {"matmul": "native", "conv2d": "native"}
    assert b.compile_report["build"]["library_calls"] > 0
    calls = {
        s
        for n in b.tenant_names
        for s, _ in b.trace(n, list(seeded_inputs(b.signature(n), 0)))[0]
        if s.startswith("mtcompile.")
    }
    assert {DENSE_PACKED_BIAS, CONV2D_BIAS} <= calls, calls
    report = b.verify(atol=1e-4)
    assert report["ok"], report
    inputs = {n: seeded_inputs(b.signature(n), 1) for n in b.tenant_names}
    want = b.run_all(inputs)
    saved = b.save(tmp_path / "bundle")
    np.savez(
        tmp_path / "in.npz", **{f"{n}.{i}": x for n, xs in inputs.items() for i, x in enumerate(xs)}
    )
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_CHILD, str(saved), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"kernels": b.manifest.kernels, "torch": []}
    got = np.load(tmp_path / "out.npz")
    for n, outs in want.items():
        for i, w in enumerate(outs):
            np.testing.assert_array_equal(got[f"{n}.{i}"], w, err_msg=f"{n} output {i}")
            np.testing.assert_array_equal(got[f"alone.{n}.{i}"], w, err_msg=f"{n} output {i}")


def test_kernel_names_are_the_table_s_rows():
    """Every form the one table lists is registered (native) or named (torch) under the
    symbol library call nodes carry; no other native kernel is registered."""
    from mtcompile.ir import ops
    from mtcompile.runtime import library

    table = native.table
    assert [library.MATMUL, library.CONV2D_BIAS] == [
        "mtcompile.torch.matmul",
        "mtcompile.torch.conv2d_bias",
    ]
    call = ops.LibraryCall("native", "matmul", variant="packed", bias=True, epilogue="add_relu")
    assert call.symbol == "mtcompile.native.dense_packed_bias_add_relu"
    assert call.form.residual and call.form.act == "relu" and call.computes == "relax.matmul"
    assert table.SYMBOLS[call.symbol] == call.form  # the reverse is a lookup
    native.register()
    for form in table.FORMS:
        if form.provider == "native":
            assert tvm_ffi.get_global_func(form.symbol, allow_missing=True) is not None, form
    assert {f.kernel.entry for f in table.FORMS} == {
        "matmul_run",
        "dense_packed_run",
        "dense_bf16_run",
        "conv2d_run",
        "conv2d_winograd_run",
        "conv2d_winograd_bf16_run",
        "conv2d_patch_run",
        "conv2d_patch_bf16_run",
        "softmax_run",
        "layer_norm_run",
        "attention_run",
    }
    with pytest.raises(
        ValueError, match="no torch library kernel 'matmul' with bias=True, epilogue='relu'"
    ):
        ops.LibraryCall("torch", "matmul", bias=True, epilogue="relu")
    with pytest.raises(ValueError, match="no library library kernel"):
        ops.LibraryCall("library", "matmul")


def test_the_generated_header_lists_every_native_form():
    """kernels_table.h, generated from the table, has one registration row per native form."""
    text = native.table.header()
    native_forms = [f for f in native.table.FORMS if f.provider == "native"]
    assert text.count('{"mtcompile.native.') == len(native_forms) == 51  # 50 + attention
    assert (
        '{"mtcompile.native.conv2d_bias_add_relu", &conv2d_run, 2, true, true, true, '
        "kActRelu}," in text
    )


POOL_CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np, torch, tvm_ffi
    import mtcompile

    class Wave(torch.nn.Module):  # generated kernels only: big elementwise work, no library op
        def forward(self, x):
            return torch.sin(x) * 2.0 + torch.cos(x)

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(512, 512)
        def forward(self, x):
            return torch.relu(self.a(x))

    x = torch.randn(512, 1024)
    y = torch.randn(64, 512)
    b = mtcompile.compile([mtcompile.Tenant("wave", Wave(), example_inputs=(x,)),
                           mtcompile.Tenant("dense", Dense().eval(), example_inputs=(y,))],
                          threads=2)
    launches = tvm_ffi.get_global_func("mtcompile.native.pool_launches")
    before = launches()
    b.run("wave", x)
    generated = launches() - before
    for _ in range(20):
        b.run_all({"wave": (x,), "dense": (y,)})
    cpu = time.process_time()
    time.sleep(0.5)  # after the calls returned: every thread of the pool asleep
    print(json.dumps({"generated": generated, "cpu_after_s": time.process_time() - cpu}))
""")


@pytest.mark.slow  # times the thread pool
def test_one_pool_serves_generated_kernels_and_sleeps_after_a_call():
    """The native pool is TVM's parallel-launch function for the bundle's generated kernels
    too (an elementwise-only tenant launches on it), and once a call returned nothing spins:
    the process uses (almost) no CPU while it sleeps half a second after 20 runs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")
    }
    r = subprocess.run(
        [sys.executable, "-c", POOL_CHILD], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["generated"] >= 1, got
    assert got["cpu_after_s"] < 0.05, got
