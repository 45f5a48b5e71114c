"""Seeded random tenant sets: repeated architectures, shared weights, shared inputs.

Each case draws 2-4 tenants from a few random architectures (vector MLP-like blocks or
small conv stacks), some with identical weights and a declared shared input, compiles
them with the default pipeline and checks every tenant against PyTorch eager, through
`run` and `run_all`. The quick subset runs CASES_QUICK cases; the slow test runs more.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import mtcompile
from mtcompile import Tenant

CASES_QUICK = 4
CASES_SLOW = 10  # the differential fuzzer (tests/test_fuzz.py) covers more random sets


class VectorNet(nn.Module):
    """A random stack over (batch, width): linear, activations, layer norm, residuals."""

    def __init__(self, arch: random.Random, width: int):
        super().__init__()
        self.steps = []
        layers = nn.ModuleList()
        for _ in range(arch.randint(2, 5)):
            kind = arch.choice(["linear", "relu", "gelu", "tanh", "norm", "residual", "softmax"])
            if kind in ("linear", "residual"):
                layers.append(nn.Linear(width, width, bias=arch.random() < 0.8))
            elif kind == "norm":
                layers.append(nn.LayerNorm(width))
            else:
                layers.append(nn.Identity())
            self.steps.append(kind)
        self.layers = layers

    def forward(self, x):
        for kind, layer in zip(self.steps, self.layers, strict=True):
            if kind == "relu":
                x = torch.relu(x)
            elif kind == "gelu":
                x = torch.nn.functional.gelu(x)
            elif kind == "tanh":
                x = torch.tanh(x)
            elif kind == "softmax":
                x = torch.softmax(x, dim=-1)
            elif kind == "residual":
                x = x + layer(x)
            else:
                x = layer(x)
        return x


class ConvNet(nn.Module):
    """A random conv stack over (1, channels, 8, 8): strides, padding, groups, batch norm."""

    def __init__(self, arch: random.Random, channels: int):
        super().__init__()
        layers = []
        c = channels
        for _ in range(arch.randint(1, 3)):
            groups = arch.choice([1, 1, 2]) if c % 2 == 0 else 1
            out, k = arch.choice([4, 6, 8]), arch.choice([1, 3])
            layers += [
                nn.Conv2d(
                    c,
                    out,
                    k,
                    stride=arch.choice([1, 2]),
                    padding=k // 2,
                    groups=groups,
                    bias=arch.random() < 0.5,
                ),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            c = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def build(kind: str, arch_seed: int, weight_seed: int) -> nn.Module:
    """The architecture drawn by `arch_seed`, its weights (and BN statistics) by `weight_seed`."""
    arch = random.Random(arch_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weight_seed)
        model = VectorNet(arch, 16) if kind == "vector" else ConvNet(arch, 4)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def random_set(seed: int) -> list[Tenant]:
    """2-4 tenants: repeated architectures, some sharing weights and a declared input."""
    rng = random.Random(seed)
    kind = rng.choice(["vector", "conv"])
    shape = (2, 16) if kind == "vector" else (1, 4, 8, 8)
    archs = [rng.randrange(1000) for _ in range(rng.randint(1, 2))]
    shared_x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    tenants = []
    for i in range(rng.randint(2, 4)):
        arch = rng.choice(archs)
        twin = i > 0 and rng.random() < 0.5  # same weights as tenant 0 and the same input
        arch = archs[0] if twin else arch
        weights = seed if twin else seed * 10 + i
        if twin or (i == 0 and rng.random() < 0.7):
            x, share = shared_x, {"x": "frame"}
        else:
            x, share = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + i)), {}
        if i == 0:
            arch = archs[0]
        tenants.append(
            Tenant(f"t{i}", build(kind, arch, weights), example_inputs=(x,), shared_inputs=share)
        )
    # a shared name must be declared by every tenant that reads that input: keep it consistent
    if sum(1 for t in tenants if t.shared_inputs) == 1:
        tenants = [Tenant(t.name, t.model, example_inputs=t.example_inputs) for t in tenants]
    return tenants


def check_case(seed: int) -> dict:
    tenants = random_set(seed)
    bundle = mtcompile.compile(tenants)
    result = bundle.verify()
    assert result["ok"], (seed, result)
    # dedup only ever shares a node among tenants that read the same input with equal weights
    # (fuse-horizontal's batched nodes, named hfuse*, serve several tenants by design)
    for n in bundle.graph.nodes:
        if len(n.tenants) > 1 and n.op != "input" and not n.name.startswith("hfuse"):
            owners = [t for t in tenants if t.name in n.tenants]
            assert all(t.shared_inputs for t in owners), (seed, str(n))
    shared = sum(1 for n in bundle.graph.nodes if len(n.tenants) > 1)
    return {"tenants": len(tenants), "shared_nodes": shared}


@pytest.mark.parametrize("seed", range(CASES_QUICK))
@pytest.mark.slow  # compiles four random sets
def test_random_tenant_sets_quick(seed):
    check_case(seed)


@pytest.mark.slow
def test_random_tenant_sets_many():
    stats = [check_case(seed) for seed in range(CASES_QUICK, CASES_QUICK + CASES_SLOW)]
    assert len(stats) == CASES_SLOW
    # the generator does produce sharing (so dedup is exercised), and not only sharing
    assert any(s["shared_nodes"] > 1 for s in stats)
    assert any(s["shared_nodes"] == 0 for s in stats)


def test_build_is_deterministic():
    a, b = build("conv", 7, 3), build("conv", 7, 3)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
