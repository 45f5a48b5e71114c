"""Kernels in bfloat16 (offload-library's ``precision="bfloat16"``: matmul's ``bf16`` and
conv2d's ``winograd_bf16`` variants): the packing, the kernels on every path they take
against float64 references, their refusals, and bundles that compile, verify within
bfloat16's tolerance, save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm_ffi
from conftest import run_child

import mtcompile
import mtcompile.native as native
from mtcompile import Tenant


def _bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 (torch rounds to nearest even), as float64."""
    return torch.from_numpy(np.ascontiguousarray(x)).bfloat16().double().numpy()


def test_pack_dense_bf16_layout_rounding_and_padding():
    """[p, j, 2c + h] holds w[2j + h, 16p + c] as bfloat16 bits, rounded to nearest even;
    zeros past K and N; a NaN stays a NaN."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 20)).astype(np.float32)
    w[0, 0] = np.float32(1 + 2**-8)  # halfway between two bfloat16 values: to the even one
    w[0, 1] = np.float32(1 + 3 * 2**-8)  # halfway again: rounds up to the even one
    w[4, 19] = np.nan
    wp = native.pack_dense_bf16(w)
    assert wp.shape == (2, 3, 32) and wp.dtype == np.uint16 and wp.flags.c_contiguous
    as_float = (wp.astype(np.uint32) << 16).view(np.float32)
    for p, j, c, h in [(0, 0, 0, 0), (0, 1, 3, 1), (1, 1, 2, 0), (1, 0, 2, 1)]:
        k, n = 2 * j + h, 16 * p + c
        assert as_float[p, j, 2 * c + h] == _bf16(w[k, n])
    assert as_float[0, 0, 0] == 1.0 and as_float[0, 0, 2] == 1 + 2**-6
    assert np.isnan(as_float[1, 2, 2 * 3])  # w[4, 19]
    assert not as_float[1, :, 2 * 4 :].any()  # columns 20..31
    assert not as_float[:, 2, 1::2].any()  # k = 5, past K


def test_has_bf16_dot_reads_the_cpu_flags(tmp_path):
    with_it, without = tmp_path / "a", tmp_path / "b"
    with_it.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16x\n")
    assert native.has_bf16_dot(str(with_it)) and not native.has_bf16_dot(str(without))
    assert native.has_bf16_dot(str(tmp_path / "missing"))  # unreadable: nothing to warn about


# (a's shape, N): one row, odd K, a partial panel, tall, K = 1, batched rows
DENSE = [((1, 17), 16), ((3, 37), 45), ((64, 256), 1024), ((197, 192), 100), ((7, 1), 9)]
DENSE += [((2, 5, 33), 70)]

BF16_CHECK = """
import numpy as np, torch, tvm_ffi
import mtcompile.native as native
native.register()
t = tvm_ffi.from_dlpack
rng = np.random.default_rng(0)
r = lambda *s: rng.standard_normal(s).astype(np.float32)
bf = lambda x: torch.from_numpy(np.ascontiguousarray(x)).bfloat16().double().numpy()
plain = tvm_ffi.get_global_func("mtcompile.native.dense_bf16")
fused = tvm_ffi.get_global_func("mtcompile.native.dense_bf16_bias_add_relu")
worst, worst32 = 0.0, 0.0
def score(out, ref, ref32):
    global worst, worst32
    worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    worst32 = max(worst32, float(np.abs(out - ref32).max() / np.abs(ref32).max()))
for sa, n in CASES:
    a, w, b = r(*sa), r(sa[-1], n), r(n)
    res = r(*sa[:-1], n)
    out = np.full(res.shape, np.nan, np.float32)
    fused(t(a), t(native.pack_dense_bf16(w)), t(b), t(res), t(out))
    score(out, np.maximum(bf(a) @ bf(w) + b + res, 0), np.maximum(a.astype(np.float64) @ w + b + res, 0))
    plain(t(a), t(native.pack_dense_bf16(w)), t(out))
    score(out, bf(a) @ bf(w), a.astype(np.float64) @ w)
# stacked weights (horizontally fused tenants), a bias per weight
a, ws, b = r(3, 40, 96), r(3, 96, 50), r(3 * 50)
wp = np.stack([native.pack_dense_bf16(x) for x in ws])
out = np.full((3, 40, 50), np.nan, np.float32)
tvm_ffi.get_global_func("mtcompile.native.dense_bf16_bias")(t(a), t(wp), t(b), t(out))
ref = np.stack([bf(a[i]) @ bf(ws[i]) + b[50 * i : 50 * i + 50] for i in range(3)])
score(out, ref, np.stack([a[i].astype(np.float64) @ ws[i] + b[50 * i : 50 * i + 50] for i in range(3)]))
print(worst, worst32)
"""


@pytest.mark.parametrize(
    "isa",
    [
        "",
        "MTCOMPILE_NATIVE_NO_BF16",
        pytest.param("MTCOMPILE_NATIVE_AVX2", marks=pytest.mark.slow),
        pytest.param("MTCOMPILE_NATIVE_GENERIC", marks=pytest.mark.slow),
    ],
)
def test_dense_bf16_matches_the_rounded_values_on_every_path(isa):
    """dense_bf16 (plain; bias + residual + ReLU; stacked weights with a bias each) equals the
    float64 product of the bfloat16-rounded activations and weights up to float32 sums, on
    VDPBF16PS (AVX-512 BF16 hosts) and on the float32 tiles that run the same rounded values
    elsewhere; and is within bfloat16's error of the float32 product, not closer than 1e-4
    (it does round)."""
    out = run_child(f"CASES = {DENSE!r}\n" + BF16_CHECK, isa=isa)
    worst, worst32 = map(float, out.split()[-2:])
    assert worst <= 1e-5
    assert 1e-4 < worst32 <= 1e-2


def test_dense_bf16_refuses_a_float32_packing_and_a_wrong_shape():
    native.register()
    dense = tvm_ffi.get_global_func("mtcompile.native.dense_bf16")
    t = tvm_ffi.from_dlpack
    a, w, out = (
        np.ones((4, 10), np.float32),
        np.ones((10, 20), np.float32),
        np.zeros((4, 20), np.float32),
    )
    with pytest.raises(TypeError, match="dense_bf16: packed weight must be uint16, found float32"):
        dense(t(a), t(native.pack_dense(w)), t(out))
    with pytest.raises(
        ValueError, match=r"packed weight has shape \[2, 5, 32\], expected \[2, 6, 32\]"
    ):
        dense(t(np.ones((4, 12), np.float32)), t(native.pack_dense_bf16(w)), t(out))


WINOGRAD_CHECK = """
import sys
import numpy as np, torch, tvm_ffi
import mtcompile.native as native
native.register()
t = tvm_ffi.from_dlpack
rng = np.random.default_rng(0)
r = lambda *s: rng.standard_normal(s).astype(np.float32)
fn = tvm_ffi.get_global_func("mtcompile.native.conv2d_winograd_bf16_bias_add_relu")
worst, outs = 0.0, []
for xs, oc, pad in [((1, 32, 34, 33), 32, (1, 1, 1, 1)), ((2, 17, 9, 13), 24, (0, 1, 2, 1))]:
    x, w, b = r(*xs), r(oc, xs[1], 3, 3), r(oc)
    ref = torch.nn.functional.pad(torch.from_numpy(x).double(), (pad[1], pad[3], pad[0], pad[2]))
    ref = torch.nn.functional.conv2d(ref, torch.from_numpy(w).double()).numpy()
    res = r(*ref.shape)
    ref = np.maximum(ref + b.reshape(-1, 1, 1) + res, 0)
    out = np.full(ref.shape, np.nan, np.float32)
    fn(t(x), t(native.winograd_weights_bf16(w)), t(b), t(res), tvm_ffi.Shape([1, 1, *pad, 1, 1, 1]), t(out))
    worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    outs.append(out)
np.savez(sys.argv[1], *outs)
print(worst)
"""


def _winograd_bf16(isa: str, path) -> tuple[float, list[np.ndarray]]:
    out = run_child(WINOGRAD_CHECK, path, isa=isa)
    with np.load(path) as z:
        return float(out.split()[-1]), [z[k] for k in z.files]


@pytest.mark.parametrize(
    "isa",
    [
        "MTCOMPILE_NATIVE_NO_BF16",
        pytest.param("MTCOMPILE_NATIVE_AVX2", marks=pytest.mark.slow),
        pytest.param("MTCOMPILE_NATIVE_GENERIC", marks=pytest.mark.slow),
    ],
)
def test_winograd_bf16_agrees_on_every_path(isa, tmp_path):
    """conv2d[winograd_bf16] (bias + residual + ReLU; odd channels, uneven padding, a batch)
    is within bfloat16's error of the float64 conv, and the host's path (VDPBF16PS where the
    CPU has it) gives what the float32 path gives on the same rounded values, to float32
    sums."""
    worst, host = _winograd_bf16("", tmp_path / "host.npz")
    other_worst, other = _winograd_bf16(isa, tmp_path / "other.npz")
    assert 1e-4 < worst <= 2e-2 and 1e-4 < other_worst <= 2e-2
    for a, b in zip(host, other, strict=True):
        assert float(np.abs(a - b).max() / np.abs(a).max()) <= 1e-5


def test_winograd_weights_bf16_are_the_rounded_transform_in_channel_pairs():
    w = np.random.default_rng(2).standard_normal((4, 5, 3, 3)).astype(np.float32)
    ub = native.winograd_weights_bf16(w)
    assert ub.shape == (16, 4, 6) and ub.dtype == np.uint16
    as_float = (ub.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(as_float[..., :5], _bf16(native.winograd_weights(w)))
    assert not as_float[..., 5].any()  # the pair of the odd channel: zero


def test_patch_bf16_is_the_dense_layer_on_rounded_patches():
    """conv2d[patch_bf16] (16x16 patches of 3 channels, a leftover row and column, a bias)
    against float64 on the same bfloat16-rounded patches and weight; a float32 packing is
    refused, naming the dtype."""
    native.register()
    rng = np.random.default_rng(3)
    x, w, b = _rand(rng, 2, 3, 50, 34), _rand(rng, 40, 3, 16, 16), _rand(rng, 40)
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(_bf16(x)), torch.from_numpy(_bf16(w)), stride=16
    ).numpy() + b.reshape(-1, 1, 1)
    out = np.full(ref.shape, np.nan, np.float32)
    fn = tvm_ffi.get_global_func("mtcompile.native.conv2d_patch_bf16_bias")
    t, params = tvm_ffi.from_dlpack, tvm_ffi.Shape([16, 16, 0, 0, 0, 0, 1, 1, 1])
    wp = native.pack_dense_bf16(np.ascontiguousarray(w.reshape(40, -1).T))
    fn(t(x), t(wp), t(b), params, t(out))
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) <= 1e-5
    f32 = native.pack_dense(np.ascontiguousarray(w.reshape(40, -1).T))
    with pytest.raises(TypeError, match="packed weight must be uint16, found float32"):
        fn(t(x), t(f32), t(b), params, t(out))


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


class TwoLinears(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = torch.nn.Linear(48, 96), torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + x[..., :32]


@pytest.mark.slow  # compiles a bundle
def test_a_bf16_bundle_verifies_within_bfloat16_saves_and_loads(tmp_path):
    """Two same-architecture tenants (their dense layers stacked by fuse-horizontal) and a
    small conv with precision="bfloat16": every dense layer takes the bf16 variant, verify
    passes the two at bfloat16's tolerance (and the error shows the rounding) and the conv,
    which has no bf16 call, at float32's; the saved bundle (uint16 weights) loads and gives
    the same outputs."""
    x = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(0))
    tenants = [Tenant(f"t{i}", TwoLinears(i).eval(), example_inputs=(x,)) for i in range(2)]
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    image = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    tenants.append(Tenant("small_conv", conv, example_inputs=(image,)))  # no bf16 call
    b = mtcompile.compile(tenants, pass_options={"offload-library": {"precision": "bfloat16"}})
    (offload,) = [p for p in b.compile_report["passes"] if p["name"] == "offload-library"]
    info = offload["run_all"]
    assert info["bf16_calls"] == info["packed_weights"] > 0
    r = b.verify()
    assert r["ok"], r
    for name in ("t0", "t1"):
        entry = r["tenants"][name]
        assert entry["precision"] == "bfloat16 kernels"
        assert 1e-5 < entry["outputs"][0]["max_rel"] <= 2e-2
    assert r["tenants"]["small_conv"]["precision"] == "float32"  # checked at 1e-4 still
    assert b.manifest.bf16_tenants() == {"t0", "t1"}
    b.save(tmp_path)
    loaded = mtcompile.load(tmp_path)
    assert loaded.manifest.kernel_precision == "bfloat16"
    np.testing.assert_array_equal(loaded.run("t1", x.numpy())[0], b.run("t1", x.numpy())[0])


@pytest.mark.slow  # compiles a bundle
def test_a_bf16_cnn_takes_winograd_bf16_and_verifies():
    """A ResNet-style CNN at 32x32 (3x3 convs of 16 and 32 channels) with
    precision="bfloat16": the convs where Winograd pays take winograd_bf16, the head the bf16
    dense layer, and verify passes at bfloat16's tolerance."""
    from mtcompile.models.zoo import resnet_cnn

    model, inputs = resnet_cnn(seed=2, image=32, width=16)
    b = mtcompile.compile(
        [Tenant("cnn", model, example_inputs=inputs)],
        pass_options={"offload-library": {"precision": "bfloat16"}},
    )
    (offload,) = [p for p in b.compile_report["passes"] if p["name"] == "offload-library"]
    info = offload["run_all"]
    assert info["winograd_convs"] >= 2 and info["bf16_calls"] == info["winograd_convs"] + 1
    r = b.verify()
    assert r["ok"] and r["tenants"]["cnn"]["precision"] == "bfloat16 kernels", r


@pytest.mark.slow  # compiles a bundle
def test_a_bf16_vit_takes_patch_bf16_and_verifies():
    """A small ViT with precision="bfloat16": its patch embedding takes patch_bf16, every
    dense layer bf16, and verify passes at bfloat16's tolerance."""
    from mtcompile.models.zoo import vit

    model, inputs = vit(seed=1, image=32, patch=8, d_model=64, heads=2, layers=2, ffn=128)
    b = mtcompile.compile(
        [Tenant("vit", model, example_inputs=inputs)],
        pass_options={"offload-library": {"precision": "bfloat16"}},
    )
    (offload,) = [p for p in b.compile_report["passes"] if p["name"] == "offload-library"]
    info = offload["run_all"]
    assert info["patch_convs"] == 1 and info["bf16_calls"] == info["packed_weights"] + 1
    r = b.verify()
    assert r["ok"] and r["tenants"]["vit"]["precision"] == "bfloat16 kernels", r


@pytest.mark.slow  # compiles the heterogeneous demo set
def test_demo_takes_kernel_precision_and_says_what_tolerance_it_checked(tmp_path, capsys):
    from mtcompile.cli import main

    assert main(["demo", "-o", str(tmp_path / "d"), "--kernel-precision", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "numerics: PASS" in out and "with bfloat16 kernels 2e-2" in out
    assert "; bfloat16 dense layers and convs (mlp, text" in out  # the summary says so
    loaded = mtcompile.load(tmp_path / "d")
    assert loaded.manifest.kernel_precision == "bfloat16"
    assert any(dtype == "uint16" for _, _, dtype in loaded.manifest.weights.tensors)
