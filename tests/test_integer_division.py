"""Integer division and remainder by a divisor the model computes: a divisor of 0 raises
`DivisionByZeroError` naming the tenant and input (PyTorch raises; the CPU's integer divide
stopped the process with SIGFPE), and the most negative value divided by -1 gives
PyTorch's result (it trapped too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import torch_outputs

import mtcompile
from mtcompile import DivisionByZeroError, Tenant

pytestmark = pytest.mark.slow  # builds a bundle of its own

LOW = np.iinfo(np.int64).min


class Divisions(torch.nn.Module):
    """Floor division, remainder and truncating division by an input, and floor division
    by a value computed from one (fused with its producer)."""

    def forward(self, a, b):
        return a // b, a % b, torch.div(a, b, rounding_mode="trunc"), (a * 3) // (b - 1)


A = torch.tensor([7, -7, 3, 9])
B = torch.tensor([2, 3, -2, 4])


@pytest.fixture(scope="module")
def bundle():
    return mtcompile.compile([Tenant("div", Divisions(), example_inputs=(A, B))])


def test_integer_division_matches_pytorch(bundle):
    got = bundle.run("div", A.numpy(), B.numpy())
    for g, w in zip(got, torch_outputs(Divisions(), (A, B)), strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("b", [[2, 0, -2, 4], [1, 3, -2, 4]])
def test_a_divisor_of_zero_raises_naming_the_tenant_and_input(bundle, b):
    # [1, ...]: the computed divisor b - 1 is 0 while b itself is not
    with pytest.raises(
        DivisionByZeroError, match=r"tenant 'div', input 'b': integer division by zero"
    ):
        bundle.run("div", A.numpy(), np.array(b))
    got = bundle.run("div", A.numpy(), B.numpy())  # the bundle still runs afterwards
    np.testing.assert_array_equal(got[0], (A // B).numpy())


def test_the_most_negative_value_divided_by_minus_one_gives_pytorch_result(bundle):
    a, b = np.array([LOW, 5, LOW, 1]), np.array([-1, -1, 2, 3])
    got = bundle.run("div", a, b)
    want = torch.tensor(a) // torch.tensor(b), torch.tensor(a) % torch.tensor(b)
    np.testing.assert_array_equal(got[0], want[0].numpy())
    np.testing.assert_array_equal(got[1], want[1].numpy())


def test_the_driver_refuses_a_divisor_of_zero_with_pythons_line(bundle, tmp_path):
    """mtcompile-run exits 3 (bad input) with the line Python raises, not 4 (internal)."""
    import subprocess

    from mtcompile.driver import command

    bundle.save(tmp_path / "b")
    a, b = A.numpy(), np.array([2, 0, -2, 4])
    with pytest.raises(DivisionByZeroError) as e:
        mtcompile.load(tmp_path / "b").run("div", a, b)
    for d in ("in", "out"):
        (tmp_path / d).mkdir()
    np.save(tmp_path / "in" / "div.a.npy", a)
    np.save(tmp_path / "in" / "div.b.npy", b)
    cmd = command(tmp_path / "b", "div", tmp_path / "in", tmp_path / "out")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"mtcompile-run: {str(e.value).splitlines()[0]}"
