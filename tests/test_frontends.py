"""Each frontend compiles a tiny model that then matches its source within 1e-4."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import LinearReLU, TinyConv, linear_relu, seeded_input, tiny_conv, torch_outputs

import mtcompile
from mtcompile import Tenant
from mtcompile.frontend.importers import import_tenant
from mtcompile.models.zoo import export_onnx

ATOL = 1e-4


def onnx_model(module, inputs, dynamic_batch: bool = False) -> onnx.ModelProto:
    """`module` exported to ONNX with input "x" and output "y" (batch symbolic if asked)."""
    if not dynamic_batch:
        return export_onnx(module, inputs, ["x"], ["y"])
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            buf,
            input_names=["x"],
            output_names=["y"],
            opset_version=17,
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            dynamo=False,
        )
    return onnx.load_model_from_string(buf.getvalue())


def check(bundle, name: str, module, inputs, source: str) -> None:
    """The bundle matches `module` (eager) on `inputs` and passes its own verify()."""
    sig = bundle.signature(name)
    assert sig.source == source
    assert [i.shape for i in sig.inputs] == [tuple(x.shape) for x in inputs]
    got = bundle.run(name, *inputs)
    want = torch_outputs(module, inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)
    report = bundle.verify(atol=ATOL)
    assert report["ok"], report
    assert report["tenants"][name]["run_all_ok"]


def test_each_frontend_imports_a_small_model():
    """torch.export, torch.fx and ONNX each import a tiny model into Relax with its input's
    name and shape, without a build (the quick tier's frontend check; the slow tests below
    compile each kind and compare numerics)."""
    m, x = linear_relu(0)
    for tenant, kind in [
        (Tenant("te", m, example_inputs=x), "torch.export"),
        (
            Tenant(
                "fx",
                torch.fx.symbolic_trace(LinearReLU(0)),
                input_shapes={"x": ((2, 8), "float32")},
            ),
            "torch.fx",
        ),
        (Tenant("ox", onnx_model(m, x)), "onnx"),
    ]:
        it = import_tenant(tenant)
        assert (it.name, it.kind, it.input_names) == (tenant.name, kind, ["x"])
        assert len(it.mod["main"].params) == 1
        assert re.search(
            r'def main\(\w+: R\.Tensor\(\(2, 8\), dtype="float32"\)\)', it.mod["main"].script()
        )


@pytest.mark.slow  # compiles a bundle of its own
def test_nn_module_via_torch_export():
    m, x = tiny_conv(0)
    check_model = TinyConv(0)
    # compile and verify trace/run in eval mode and give every submodule its own mode back
    # (here a fine-tuning setup: training, with a frozen BatchNorm).
    m.train()
    m.bn.eval()
    bundle = mtcompile.compile([Tenant("conv", m, example_inputs=x)])
    assert m.training and m.conv.training and not m.bn.training
    check(bundle, "conv", check_model, x, "torch.export")
    assert bundle.verify(atol=ATOL)["ok"]  # the reference runs m in eval mode...
    assert m.training and m.conv.training and not m.bn.training  # ...and restores its modes
    assert bundle.signature("conv").inputs[0].name == "x"


@pytest.mark.slow  # compiles a bundle of its own
def test_nn_module_with_numpy_example_inputs():
    m, (x,) = linear_relu(0)
    bundle = mtcompile.compile([Tenant("lin", m, example_inputs=[x.numpy()])])  # list is fine
    check(bundle, "lin", m, (x,), "torch.export")


@pytest.mark.slow  # compiles a bundle of its own
def test_fx_graph_module_with_input_shapes():
    m = LinearReLU(0)
    gm = torch.fx.symbolic_trace(m)
    bundle = mtcompile.compile([Tenant("fx", gm, input_shapes={"x": ((2, 8), "float32")})])
    x = seeded_input(5, 2, 8)
    check(bundle, "fx", m, (x,), "torch.fx")
    assert [i.to_dict() for i in bundle.signature("fx").inputs] == [
        {"name": "x", "shape": [2, 8], "dtype": "float32"}
    ]


@pytest.mark.slow  # compiles a bundle of its own
def test_fx_graph_module_with_example_inputs():
    m, x = tiny_conv(1)
    gm = torch.fx.symbolic_trace(m)
    bundle = mtcompile.compile([Tenant("fx", gm, example_inputs=x)])
    check(bundle, "fx", m, x, "torch.fx")


@pytest.mark.slow  # compiles a bundle of its own
def test_exported_program():
    m, x = tiny_conv(2)
    ep = torch.export.export(m, x)
    bundle = mtcompile.compile([Tenant("ep", ep)])  # no example inputs needed
    check(bundle, "ep", m, x, "torch.export")


@pytest.mark.slow  # compiles a bundle of its own
def test_onnx_model_proto():
    m, x = tiny_conv(3)
    bundle = mtcompile.compile([Tenant("ox", onnx_model(m, x), example_inputs=x)])
    check(bundle, "ox", m, x, "onnx")
    sig = bundle.signature("ox")
    assert [i.name for i in sig.inputs] == ["x"]
    assert [o.name for o in sig.outputs] == ["y"]  # ONNX output names are kept


@pytest.mark.slow  # compiles a bundle of its own
def test_onnx_path_with_shapes_from_the_file(tmp_path):
    m, x = tiny_conv(4)
    path = tmp_path / "conv.onnx"
    onnx.save(onnx_model(m, x), str(path))
    bundle = mtcompile.compile([Tenant("file", path)])  # a Path...
    check(bundle, "file", m, x, "onnx")
    bundle = mtcompile.compile([Tenant("file", str(path))])  # ...or a str
    check(bundle, "file", m, x, "onnx")


@pytest.mark.slow  # compiles a bundle of its own
def test_onnx_path_with_input_shapes_override(tmp_path):
    m, x = tiny_conv(5)
    path = tmp_path / "dyn.onnx"
    onnx.save(onnx_model(m, x, dynamic_batch=True), str(path))
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    bundle = mtcompile.compile([Tenant("dyn", path, input_shapes={"x": ((3, 3, 8, 8), "float32")})])
    x3 = (seeded_input(7, 3, 3, 8, 8),)
    check(bundle, "dyn", m, x3, "onnx")
    assert bundle.signature("dyn").outputs[0].shape == (3, 5)


@pytest.mark.slow  # compiles a bundle of its own
def test_all_frontends_in_one_bundle(tmp_path):
    m1, x1 = tiny_conv(0)
    m2, x2 = linear_relu(1)
    path = tmp_path / "lin.onnx"
    onnx.save(onnx_model(m2, x2), str(path))
    tenants = [
        Tenant("module", m1, example_inputs=x1),
        Tenant("fx", torch.fx.symbolic_trace(m2), example_inputs=x2),
        Tenant("program", torch.export.export(m1, x1)),
        Tenant("proto", onnx_model(m1, x1)),
        Tenant("path", path),
    ]
    bundle = mtcompile.compile(tenants)
    assert bundle.tenant_names == ["module", "fx", "program", "proto", "path"]
    report = bundle.verify(atol=ATOL)
    assert report["ok"], report
    for name, module, x in [
        ("module", m1, x1),
        ("program", m1, x1),
        ("proto", m1, x1),
        ("fx", m2, x2),
        ("path", m2, x2),
    ]:
        np.testing.assert_allclose(
            bundle.run(name, *x)[0], torch_outputs(module, x)[0], rtol=0, atol=ATOL
        )
    # Identical weights under three frontends are still stored once.
    assert bundle.manifest.graph.weight_bytes < bundle.manifest.graph.weight_bytes_before_merge


@pytest.mark.slow  # imports six models
def test_source_hash_follows_the_weights():
    m, x = tiny_conv(0)
    h0 = import_tenant(Tenant("a", m, example_inputs=x)).source_hash
    assert h0 == import_tenant(Tenant("b", TinyConv(0), example_inputs=x)).source_hash
    assert h0 != import_tenant(Tenant("a", TinyConv(1), example_inputs=x)).source_hash
    p0 = onnx_model(m, x)
    assert (
        import_tenant(Tenant("a", p0)).source_hash
        == import_tenant(Tenant("a", onnx_model(TinyConv(0), x))).source_hash
    )
    assert (
        import_tenant(Tenant("a", p0)).source_hash
        != import_tenant(Tenant("a", onnx_model(TinyConv(1), x))).source_hash
    )
    assert len(h0) == 64 and int(h0, 16) >= 0


@pytest.mark.slow
def test_heterogeneous_set_matches_sources(hetero_bundle):
    assert [hetero_bundle.signature(t).source for t in hetero_bundle.tenant_names] == [
        "torch.export",
        "onnx",
        "torch.fx",
    ]
    report = hetero_bundle.verify(atol=ATOL)
    assert report["ok"], report


@pytest.mark.slow  # compiles a bundle of its own
def test_the_same_tensor_twice_stays_two_inputs():
    """torch.export makes one graph input of a tensor passed twice; the importer copies it, so
    a tenant traced with (x, x) still computes with whatever two inputs it is given."""

    class Sub(torch.nn.Module):
        def forward(self, a, b):
            return a - b

    x = torch.ones(2, 3)
    bundle = mtcompile.compile([mtcompile.Tenant("sub", Sub(), example_inputs=(x, x))])
    a, b = np.full((2, 3), 5, np.float32), np.full((2, 3), 2, np.float32)
    np.testing.assert_array_equal(bundle.run("sub", a, b)[0], a - b)


class Scans(torch.nn.Module):
    """transformers' packed-sequence mask ((position_diff != 1).cumsum(-1), every decoder),
    an int32 cumsum and a bool cumprod: PyTorch accumulates all three in int64."""

    def forward(self, pos, x):
        diff = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
        seg = (diff != 1).cumsum(-1)
        run = (x > 0).cumprod(-1)
        return seg, (x > 0).int().cumsum(-1), run, x * seg + run


@pytest.mark.slow  # compiles a bundle of its own
def test_cumsum_and_cumprod_of_bool_and_int_accumulate_in_int64():
    """Regression: TVM's importer scanned bool and int inputs in their own dtype (a bool
    cumsum failed in LLVM codegen, CreateAdd's kDLFloat check)."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 7]])
    x = seeded_input(4, 2, 8)
    bundle = mtcompile.compile([Tenant("scan", Scans(), example_inputs=(pos, x))])
    got = bundle.run("scan", pos, x)
    want = torch_outputs(Scans(), (pos, x))
    assert [g.dtype for g in got] == [w.dtype for w in want] == [np.int64] * 3 + [np.float32]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and np.abs(g - w).max() <= 1e-4 * np.abs(w).max()


def test_an_import_whose_output_type_differs_from_pytorch_is_refused(monkeypatch):
    """TVM's own index.Tensor converter gave w[i, :, j] the shape [3, 4, 3] (PyTorch: [3, 4]);
    the import compares every output's dtype and static dims with PyTorch's."""
    from mtcompile.errors import TenantError
    from mtcompile.frontend.converters import CONVERTERS

    class SliceBetween(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(10, 4, 3))

        def forward(self, i, j):
            return self.w[i, :, j]

    monkeypatch.setitem(CONVERTERS, "index.Tensor", lambda node, imp: imp._index_tensor(node))
    i, j = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    with pytest.raises(
        TenantError, match=r"tenant 's': output 0: .*float32\[3, 4, 3\], PyTorch float32\[3, 4\]"
    ):
        import_tenant(Tenant("s", SliceBetween(), example_inputs=(i, j)))
