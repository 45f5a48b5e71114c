"""Values a model computes from its small constants are computed once at import
(`mtcompile.frontend.fold`): the graph holds them as constants, weights are left alone, and
the compiled bundle still matches PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtcompile
from mtcompile.analysis.schedule import constant_only
from mtcompile.frontend.fold import fold_constants
from mtcompile.frontend.importers import import_tenant
from mtcompile.frontend.lift import lift
from mtcompile.ir.graph import WEIGHT_MIN_BYTES, ConstRef


class Rope(torch.nn.Module):
    """A causal mask and rotary-like tables built from literals (arange, full, triu, pow,
    sin, cos, cat), and a weight the model transposes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):  # x: (2, 8, 16)
        n = x.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
        ang = torch.arange(n, dtype=torch.float32)[:, None] * inv[None, :]
        h = (x + torch.cat([ang.sin(), ang.cos()], -1)) @ self.w.t()
        return (h @ x.transpose(1, 2) + mask).softmax(-1)


def _tenant():
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    return mtcompile.Tenant("rope", Rope().eval(), (x,))


def _graphs():
    it = import_tenant(_tenant())
    main = it.mod["main"]
    return lift(main, "rope", it.input_names), lift(
        fold_constants(main, "rope"), "rope", it.input_names
    )


def test_values_of_constants_alone_become_constants_and_weights_stay():
    before, after = _graphs()
    assert len(constant_only(before)) >= 8  # arange, pow, sin, cos, cat, full, triu, ...
    # what is left computed from constants alone is the weight's transpose: a weight is
    # passed to the bundle's functions as a parameter, never folded
    left = [after.node(n) for n in constant_only(after)]
    assert [n.op for n in left] == ["relax.permute_dims"]
    (w,) = left[0].args
    assert isinstance(w, ConstRef) and after.constants[w.key].nbytes >= WEIGHT_MIN_BYTES
    assert len(after) < len(before) - 6
    # the folded mask: -inf above the diagonal, 0 on and below it
    masks = [a for a in after.constants.values() if a.shape == (8, 8) and np.isinf(a).any()]
    assert len(masks) == 1
    np.testing.assert_array_equal(masks[0], np.triu(np.full((8, 8), -np.inf, np.float32), 1))


def test_a_model_with_folded_values_matches_pytorch():
    t = _tenant()
    bundle = mtcompile.compile([t])
    (got,) = bundle.run("rope", *t.example_inputs)
    with torch.no_grad():
        want = t.model(*t.example_inputs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_function_without_such_values_is_returned_as_it_is():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x * 2.0 + 1.0

    t = mtcompile.Tenant("plain", Plain(), (torch.ones(2, 3),))
    main = import_tenant(t).mod["main"]
    assert fold_constants(main, "plain") is main


def test_a_gather_of_a_constant_table_out_of_range_is_left_to_the_build_check():
    class Gather(torch.nn.Module):
        def forward(self, x):
            table = torch.arange(4, dtype=torch.float32)
            return x + table[torch.tensor([7])]  # index 7 of 4 rows: out of range

    t = mtcompile.Tenant("gather", Gather(), (torch.ones(1),))
    main = import_tenant(t).mod["main"]
    assert "take" in str(fold_constants(main, "gather"))  # not read out of bounds here
    with pytest.raises(mtcompile.MTCompileError, match="gather"):
        mtcompile.compile([t])


def test_an_integer_division_by_a_constant_zero_is_left_to_the_build_check():
    class Div(torch.nn.Module):
        def forward(self, x):
            return x + torch.arange(4) // torch.zeros(4, dtype=torch.int64)

    t = mtcompile.Tenant("div", Div(), (torch.ones(4, dtype=torch.int64),))
    with pytest.raises(mtcompile.MTCompileError, match="div"):
        mtcompile.compile([t])


def test_a_check_torch_export_keeps_and_tvm_drops_is_said():
    """``one_hot`` asserts its class range at run time (``_assert_async``); TVM's importer
    drops the assert, so the compile says so (an out-of-range class gives a zero row)."""

    class OneHot(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x, 5).float()

    t = mtcompile.Tenant("oh", OneHot(), (torch.tensor([1, 2, 4]),))
    with pytest.warns(UserWarning, match="tenant 'oh': the model checks at run time that"):
        import_tenant(t)
