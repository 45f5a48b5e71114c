"""fuse-attention and the native attention kernel: the kernel against float64 numpy (tile
tails, one row, several heads), the chains the pass takes and the ones it leaves, and a built
bundle against PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import tvm_ffi
from torch import nn

import mtcompile
import mtcompile.native as native
from mtcompile import Tenant
from mtcompile.frontend.importers import import_tenant
from mtcompile.frontend.lift import lift
from mtcompile.ir import ops
from mtcompile.native import table
from mtcompile.pass_infra import PassContext, run_passes
from mtcompile.passes import build_pipeline

NATIVE = {"matmul": "native", "conv2d": "native"}
UP_TO = ["offload-library", "fuse-attention"]


class Attention(nn.Module):
    """Self-attention over (batch, seq, d): softmax(q k^T / sqrt(d_head) [+ mask]) v per head;
    `expose` also returns the scores (then they have a second reader)."""

    def __init__(
        self,
        d: int = 32,
        heads: int = 2,
        mask: bool = False,
        expose: bool = False,
        scale_first: bool = False,
    ):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.heads, self.expose, self.scale_first = (
            nn.Linear(d, 3 * d),
            heads,
            expose,
            scale_first,
        )
        self.mask = nn.Parameter(torch.randn(1, 1, 1, 1)) if mask else None

    def forward(self, x: torch.Tensor):
        b, s, d = x.shape
        dh = d // self.heads
        q, k, v = (
            t.reshape(b, s, self.heads, dh).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)
        )
        if self.scale_first:
            q = q * (1.0 / math.sqrt(dh))
            scores = q @ k.transpose(-2, -1)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(dh)
        if self.mask is not None:
            scores = scores + self.mask
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, s, d)
        return (out, scores) if self.expose else out


def _x(seq: int = 12, d: int = 32) -> torch.Tensor:
    return torch.randn(1, seq, d, generator=torch.Generator().manual_seed(1))


def _fused(model: nn.Module) -> int:
    it = import_tenant(Tenant("t", model, example_inputs=(_x(),)))
    graph = lift(it.mod["main"], "t", it.input_names)
    out, _ = run_passes(graph, build_pipeline(UP_TO), PassContext("llvm", NATIVE))
    return sum(1 for n in out.nodes if getattr(ops.library_call(n), "kernel", "") == "attention")


@pytest.mark.parametrize(
    "lead,s,d,t,e",
    [
        ((4,), 64, 64, 64, 64),
        ((3,), 37, 64, 37, 64),
        ((1,), 1, 3, 7, 9),
        ((2,), 17, 8, 33, 16),
        ((2,), 40, 5, 1, 3),
        ((2, 3), 9, 8, 11, 4),
    ],
)
def test_kernel_matches_numpy(lead, s, d, t, e):
    native.register()
    fn = tvm_ffi.get_global_func(table.find("native", "attention").symbol)
    rng = np.random.default_rng(s + d + t + e)
    q, kt, v = (
        rng.standard_normal((*lead, *x), dtype=np.float32) for x in ((s, d), (d, t), (t, e))
    )
    out = np.full((*lead, s, e), np.nan, np.float32)
    fn(*(tvm_ffi.from_dlpack(a) for a in (q, kt, v, np.array([0.3], np.float32), out)))
    scores = (q.astype(np.float64) @ kt) * np.float32(0.3)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_mismatched_shapes():
    native.register()
    fn = tvm_ffi.get_global_func(table.find("native", "attention").symbol)
    q, kt, v = (
        np.zeros((2, 4, 8), np.float32),
        np.zeros((2, 8, 5), np.float32),
        np.zeros((2, 6, 3), np.float32),
    )  # v has 6 keys, kt 5
    out = np.zeros((2, 4, 3), np.float32)
    with pytest.raises(
        ValueError, match=r"attention: q \[2, 4, 8\], kt \[2, 8, 5\], v \[2, 6, 3\]"
    ):
        fn(*(tvm_ffi.from_dlpack(a) for a in (q, kt, v, np.array([1.0], np.float32), out)))


@pytest.mark.parametrize(
    "model,want",
    [
        (Attention(), 1),  # q @ k^T / sqrt(d)
        (Attention(scale_first=True), 0),  # q scaled before the product: no scaled product
        (Attention(mask=True), 0),  # a mask added before softmax
        (Attention(expose=True), 0),  # the scores are an output too
    ],
)
def test_pass_takes_only_whole_chains(model, want):
    assert _fused(model) == want


@pytest.mark.slow  # builds a bundle through TVM
def test_bundle_matches_pytorch():
    model = Attention(d=64, heads=4)
    x = _x(seq=20, d=64)
    bundle = mtcompile.compile([Tenant("attn", model, example_inputs=(x,))])
    assert "attention" in str(bundle.graph)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(bundle.run("attn", x.numpy())[0], ref, rtol=1e-4, atol=1e-5)
