"""Shared fixtures: tiny torch modules, hand-built graphs and bundles compiled once per session.

The quick tier (``-m "not slow"``) compiles only the session bundles here: `tiny_bundle`
(three tiny tenants) and `lin_pair` (two one-tenant bundles), plus a few module fixtures
named in the README's "Tests"; a test that compiles a bundle of its own is marked ``slow``.
The heterogeneous demo set is compiled once per session and only by tests marked ``slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import mtcompile
from mtcompile import Tenant
from mtcompile.ir.graph import (
    GET_ITEM,
    INPUT,
    TUPLE,
    ConstRef,
    Graph,
    Node,
    Opaque,
    Ref,
    TenantIO,
    TensorTy,
    TupleTy,
    const_key,
)

# --------------------------------------------------------------------------- tiny modules


class LinearReLU(nn.Module):
    """Linear(8 -> 4) + ReLU on (2, 8) float32."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc = nn.Linear(8, 4)
        self.eval()

    def forward(self, x):
        return torch.relu(self.fc(x))


class TinyConv(nn.Module):
    """Conv + BatchNorm + ReLU + global pool + Linear on (1, 3, 8, 8) float32 -> (1, 5)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(6)
            with torch.no_grad():
                self.bn.running_mean.normal_(0, 0.1)
                self.bn.running_var.uniform_(0.5, 1.5)
            self.fc = nn.Linear(6, 5)
        self.eval()

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


class MultiOut(nn.Module):
    """Three outputs of different shapes and dtypes: (relu(x), 2 * x sum over rows, argmax)."""

    def forward(self, x):
        return torch.relu(x), (2 * x).sum(dim=1), torch.argmax(x, dim=1)


def seeded_input(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def linear_relu(seed: int = 0):
    """(module, example_inputs) of a LinearReLU."""
    return LinearReLU(seed), (seeded_input(100 + seed, 2, 8),)


def tiny_conv(seed: int = 0):
    """(module, example_inputs) of a TinyConv."""
    return TinyConv(seed), (seeded_input(200 + seed, 1, 3, 8, 8),)


def torch_outputs(module, inputs) -> list[np.ndarray]:
    """Eager outputs of `module` as a flat list of numpy arrays."""
    with torch.no_grad():
        out = module(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


# --------------------------------------------------------------------------- hand-built graphs

F24 = TensorTy((2, 4), "float32")
F23 = TensorTy((2, 3), "float32")
W = np.arange(12, dtype=np.float32).reshape(4, 3)
WKEY = const_key(W)


def attrs(text: str, obj=None) -> Opaque:
    """TVM attrs in hand-built graphs (printed as `text`; `obj`: the attrs object itself,
    None for a graph that is never emitted)."""
    return Opaque(obj, f"test:{text}", text)


def matmul_attrs():
    """The attrs of ``relax.matmul(..., out_dtype="float32")``."""
    from tvm import relax

    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    return relax.op.matmul(x, x, out_dtype="float32").attrs


def small_graph() -> Graph:
    """Two tenants: a = relu(x @ W), b = (y, y) split back into its first item."""
    a = [
        Node("a.x", INPUT, (), F24, ("a",)),
        Node(
            "a.mm",
            "relax.matmul",
            (Ref("a.x"), ConstRef(WKEY)),
            F23,
            ("a",),
            attrs("out_dtype=float32", matmul_attrs()),
        ),
        Node("a.r", "relax.nn.relu", (Ref("a.mm"),), F23, ("a",)),
    ]
    b = [
        Node("b.y", INPUT, (), F23, ("b",)),
        Node("b.t", TUPLE, (Ref("b.y"), Ref("b.y")), TupleTy((F23, F23)), ("b",)),
        Node("b.g", GET_ITEM, (Ref("b.t"),), F23, ("b",), 0),
    ]
    tenants = {
        "a": TenantIO((("x", "a.x"),), (Ref("a.r"),)),
        "b": TenantIO((("y", "b.y"),), (Ref("b.g"),)),
    }
    return Graph(tuple(a + b), tenants, {WKEY: W})


@pytest.fixture
def graph() -> Graph:
    g = small_graph()
    g.verify()
    return g


# --------------------------------------------------------------------------- compiled bundles


def tiny_tenants() -> list[Tenant]:
    """Three tiny tenants: one output, a conv net, and three outputs of mixed dtypes."""
    m1, x1 = linear_relu(0)
    m2, x2 = tiny_conv(0)
    return [
        Tenant("lin", m1, example_inputs=x1),
        Tenant("conv", m2, example_inputs=x2),
        Tenant("multi", MultiOut(), example_inputs=(seeded_input(300, 3, 5),)),
    ]


@pytest.fixture(scope="session")
def tiny_bundle():
    """The tiny tenants compiled once per session (well under a second)."""
    return mtcompile.compile(tiny_tenants())


@pytest.fixture(scope="session")
def tiny_saved(tiny_bundle, tmp_path_factory):
    """`tiny_bundle` saved once per session; tests must not modify this directory."""
    return tiny_bundle.save(tmp_path_factory.mktemp("tiny_saved"))


@pytest.fixture(scope="session")
def lin_pair():
    """Two bundles of one tenant 'lin' (LinearReLU seeds 1 and 2) whose outputs differ:
    (a, b, example inputs); tests must not modify them."""
    (ma, x), (mb, _) = linear_relu(1), linear_relu(2)
    a = mtcompile.compile([Tenant("lin", ma, example_inputs=x)])
    b = mtcompile.compile([Tenant("lin", mb, example_inputs=x)])
    assert not np.array_equal(a.run("lin", *x)[0], b.run("lin", *x)[0])
    return a, b, x


@pytest.fixture(scope="session")
def hetero_tenants():
    from mtcompile.models import get_set

    return get_set("heterogeneous")


@pytest.fixture(scope="session")
def hetero_bundle(hetero_tenants):
    """The heterogeneous demo set compiled once per session (a few seconds; slow tests only)."""
    return mtcompile.compile(hetero_tenants)


def run_child(
    script: str, *args, isa: str = "", env: dict | None = None, timeout: int = 300
) -> str:
    """Run `script` in a fresh Python (``python -c script args...``) and return its stdout,
    asserting it exited 0 (its stderr's end otherwise). The native kernels' ISA switches
    (``MTCOMPILE_NATIVE_*``, read when the library loads) are cleared, then `isa` set to 1 if
    given; `env`: more variables."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("MTCOMPILE_NATIVE_")}
    child |= ({isa: "1"} if isa else {}) | (env or {})
    r = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
