"""Lift (Relax -> Graph) and lowering (Graph -> Relax -> executable) are exact inverses.

Reference: the module TVM's importer produced, compiled by TVM directly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import tvm
from conftest import MultiOut, linear_relu, seeded_input, tiny_conv
from tvm import relax

from mtcompile import Tenant
from mtcompile.abi import RUN_ALL
from mtcompile.backend.lowering import emit_module
from mtcompile.errors import LoweringError, TenantError
from mtcompile.frontend.importers import import_tenant
from mtcompile.frontend.lift import lift
from mtcompile.ir.graph import INPUT, TensorTy
from mtcompile.ir.relax_types import lift_type
from mtcompile.models.zoo import export_onnx
from mtcompile.pass_infra import PassContext
from mtcompile.passes.eliminate_dead_nodes import EliminateDeadNodes


class AddInt64(torch.nn.Module):
    """x + b with int64 b whose first value does not fit in int32."""

    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.tensor([2**40, -3, 7], dtype=torch.int64))

    def forward(self, x):
        return x + self.b


def _tenants():
    m, x = linear_relu(0)
    yield "linear", lambda: Tenant("t", m, example_inputs=x)
    c, xc = tiny_conv(0)
    yield "conv_bn", lambda: Tenant("t", c, example_inputs=xc)  # batch_norm: tuple + get_item
    yield "multi_out", lambda: Tenant("t", MultiOut(), example_inputs=(seeded_input(1, 3, 5),))
    yield "int64", lambda: Tenant("t", AddInt64(), example_inputs=(torch.tensor([1, 2, 3]),))
    yield "onnx", lambda: Tenant("t", export_onnx(m, x, ["x"], ["y"]), example_inputs=x)


CASES = dict(_tenants())


def build(mod, target):
    """TVM's own compile: lift + emit are checked against the importer's module, both built
    by TVM alone (our kernel providers are outside this test)."""
    return tvm.compile(mod, target)


def _run(vm_fn, inputs) -> list[np.ndarray]:
    out = vm_fn(*[tvm.runtime.tensor(np.asarray(a)) for a in inputs])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow  # builds modules through TVM
def test_lift_emit_build_is_bit_identical(case):
    t = CASES[case]()
    it = import_tenant(t)
    inputs = [x.numpy() for x in t.example_inputs]
    ref_vm = relax.VirtualMachine(tvm.compile(it.mod, "llvm"), tvm.cpu())
    want = _run(ref_vm["main"], inputs)

    g = lift(it.mod["main"], "t", it.input_names)
    vm = relax.VirtualMachine(build(emit_module(g), "llvm"), tvm.cpu())
    got = _run(vm["t"], inputs)
    together = _run(vm[RUN_ALL], inputs)
    assert len(got) == len(want) == len(g.tenants["t"].outputs)
    for a, b, c in zip(got, want, together, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)


@pytest.mark.parametrize("case", ["conv_bn", "multi_out"])
def test_lifted_types_match_relax(case):
    it = import_tenant(CASES[case]())
    func = it.mod["main"]
    g = lift(func, "t", it.input_names)
    # Every binding of the source becomes a node of the same name and type (aliases and
    # constants become references, not nodes).
    checked = 0
    for block in func.body.blocks:
        for b in block.bindings:
            if f"t.{b.var.name}" in g:
                assert g.node(f"t.{b.var.name}").ty == lift_type(b.var.ty, "test")
                checked += 1
    assert checked == len([n for n in g.nodes if n.op != INPUT])
    # Each input keeps its name, shape and dtype.
    for p, (local, node) in zip(func.params, g.tenants["t"].inputs, strict=True):
        assert local == p.name and g.node(node).ty == lift_type(p.ty, "test")
    # ...and every binding emitted back (the live ones) has the type the graph recorded.
    live = EliminateDeadNodes().run(g, PassContext()).graph
    emitted = emit_module(g)["t"]
    by_hint = {n.name.replace(".", "_"): n for n in g.nodes}
    seen = 0
    for block in emitted.body.blocks:
        for b in block.bindings:
            if b.var.name in by_hint:
                assert lift_type(b.var.ty, "test") == by_hint[b.var.name].ty
                seen += 1
    assert seen == len([n for n in live.nodes if n.op != INPUT])


@pytest.mark.slow  # builds modules through TVM
def test_int64_constants_keep_their_dtype():
    t = CASES["int64"]()
    it = import_tenant(t)
    g = lift(it.mod["main"], "t", it.input_names)
    (arr,) = g.constants.values()
    assert arr.dtype == np.int64
    np.testing.assert_array_equal(arr, [2**40, -3, 7])
    (binding,) = [b for b in emit_module(g)["t"].body.blocks[0].bindings if b.var.name == "t_lv"]
    assert str(binding.value.args[1].value.dtype) == "int64"
    vm = relax.VirtualMachine(build(emit_module(g), "llvm"), tvm.cpu())
    (out,) = _run(vm["t"], [np.array([1, 2, 3])])
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [2**40 + 1, -1, 10])


class ScaleFloat64(torch.nn.Module):
    """x * b with float64 b whose values are not representable in float32."""

    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.tensor([1 + 2**-40, 1e300, -3.0], dtype=torch.float64))

    def forward(self, x):
        return x * self.b


@pytest.mark.slow  # builds modules through TVM
def test_float64_constants_keep_their_dtype():
    x = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    it = import_tenant(Tenant("t", ScaleFloat64(), example_inputs=(x,)))
    g = lift(it.mod["main"], "t", it.input_names)
    (arr,) = g.constants.values()
    assert arr.dtype == np.float64
    vm = relax.VirtualMachine(build(emit_module(g), "llvm"), tvm.cpu())
    (out,) = _run(vm["t"], [x.numpy()])
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1 + 2**-40, 2e300, -1.5])


def test_lift_names_inputs_and_nodes_per_tenant():
    it = import_tenant(CASES["linear"]())
    g = lift(it.mod["main"], "vision", ["image"])
    assert g.tenants["vision"].inputs == (("image", "vision.image"),)
    assert all(n.name.startswith("vision.") and n.tenants == ("vision",) for n in g.nodes)
    assert g.node("vision.image").ty == TensorTy((2, 8), "float32")


def test_lift_rejects_symbolic_shapes():
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 4], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.relu(x))
        bb.emit_func_output(y)
    with pytest.raises(TenantError, match=r"tenant 'dyn', input x: symbolic dimension n"):
        lift(bb.get()["main"], "dyn")


def test_lowering_checks_types_against_the_graph():
    it = import_tenant(CASES["linear"]())
    g = lift(it.mod["main"], "t", it.input_names)
    relu = next(n for n in g.nodes if n.op == "relax.nn.relu")
    wrong = TensorTy((2, 5), "float32")
    bad = replace(g, nodes=tuple(replace(n, ty=wrong) if n is relu else n for n in g.nodes))
    with pytest.raises(
        LoweringError,
        match=rf"tenant 't': %{relu.name} = relax.nn.relu has "
        r"type f32\[2,4\] after emission, the graph says f32\[2,5\]",
    ):
        emit_module(bad)
