"""Dynamic batch: one bundle serves any size within declared bounds (torch.export
``dynamic_shapes``, ONNX ``dim_param`` and fx named dims with ``dim_bounds``), through lift,
the default pipeline, lowering, memory planned at the bound, run/run_all and the manifest."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.export import Dim

import mtcompile
from mtcompile import Tenant
from mtcompile.api import tune
from mtcompile.errors import InputError, MTCompileError, TenantError

BOUND = 8  # every dynamic dim of the shared bundle lies in [1, BOUND]
SIZES = (1, 5, BOUND)  # batch 1, an odd size, the bound
ATOL = 1e-4


class ConvNet(nn.Module):
    """Conv + ReLU + flatten + Linear on (batch, 3, 6, 6)."""

    def __init__(self, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 6 * 6, 5)
        self.eval()

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class MLP(nn.Module):
    """Linear + ReLU + Linear + softmax on (batch, 6)."""

    def __init__(self, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a, self.b = nn.Linear(6, 7), nn.Linear(7, 3)
        self.eval()

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).softmax(-1)


class TwoInputs(nn.Module):
    """relu(x @ W) + y, both inputs of batch n."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.fc = nn.Linear(6, 4)
        self.eval()

    def forward(self, x, y):
        return torch.relu(self.fc(x)) + y


def onnx_mlp(model: nn.Module) -> onnx.ModelProto:
    """`model` exported to ONNX with a dynamic batch axis named ``batch``."""
    f = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(2, 6),), f, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return onnx.load_from_string(f.getvalue())


def x_of(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    return {"te": ConvNet(0), "te2": ConvNet(1), "ox": MLP(2), "fx": TwoInputs()}


@pytest.fixture(scope="module")
def dyn(models):
    """One bundle, default pipeline: two torch.export tenants (same architecture, bounds
    BOUND and 4), an ONNX tenant and an fx tenant of two inputs sharing a named dim."""
    return mtcompile.compile([
        Tenant("te", models["te"], example_inputs=(x_of(0, 2, 3, 6, 6),),
               dynamic_shapes={"x": {0: Dim("batch", min=1, max=BOUND)}}),
        Tenant("te2", models["te2"], example_inputs=(x_of(0, 2, 3, 6, 6),),
               dynamic_shapes={"x": {0: Dim("batch", min=1, max=4)}}),
        Tenant("ox", onnx_mlp(models["ox"]), dim_bounds={"batch": (1, BOUND)}),
        Tenant("fx", torch.fx.symbolic_trace(models["fx"]),
               input_shapes={"x": (("n", 6), "float32"), "y": (("n", 4), "float32")},
               dim_bounds={"n": (1, BOUND)}),
    ], name="dyn")


def inputs_of(tenant: str, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    if tenant in ("te", "te2"):
        return (x_of(seed, n, 3, 6, 6),)
    if tenant == "ox":
        return (x_of(seed, n, 6),)
    return (x_of(seed, n, 6), x_of(seed + 1, n, 4))


def expected(models, tenant: str, inputs) -> np.ndarray:
    with torch.no_grad():
        return models[tenant](*inputs).numpy()


@pytest.mark.parametrize("tenant", ["te", "ox", "fx"])
def test_run_any_size_within_bounds(dyn, models, tenant):
    for n in SIZES:
        xs = inputs_of(tenant, n, seed=n)
        (out,) = dyn.run(tenant, *xs)
        assert out.shape[0] == n
        np.testing.assert_allclose(out, expected(models, tenant, xs), atol=ATOL, rtol=0)


def test_run_all_each_tenant_its_own_size(dyn, models):
    for sizes in ({"te": 1, "te2": 4, "ox": 5, "fx": BOUND}, {"te": BOUND, "te2": 3, "ox": 1,
                                                                 "fx": 5}):
        given = {t: inputs_of(t, n, seed=7) for t, n in sizes.items()}
        outs = dyn.run_all(given)
        for t, n in sizes.items():
            assert outs[t][0].shape[0] == n
            np.testing.assert_allclose(outs[t][0], expected(models, t, given[t]), atol=ATOL,
                                       rtol=0)


def test_size_past_the_bound_is_refused(dyn):
    with pytest.raises(InputError, match=r"tenant 'te2', input 'x': dim 0 \('batch'\) is 5, "
                                         r"outside its bounds \[1, 4\]"):
        dyn.run("te2", *inputs_of("te2", 5))
    with pytest.raises(InputError, match=r"tenant 'ox'.*dim 0 \('batch'\) is 9.*\[1, 8\]"):
        dyn.run_all({**{t: inputs_of(t, 1) for t in ("te", "te2", "fx")},
                     "ox": inputs_of("ox", BOUND + 1)})
    with pytest.raises(InputError, match="dim 'n' is 2 in input 'x'.*but 3 in input 'y'"):
        dyn.run("fx", x_of(0, 2, 6), x_of(0, 3, 4))
    with pytest.raises(InputError, match=r"expected float32\[batch, 3, 6, 6\]"):
        dyn.run("te", x_of(0, 2, 3, 6, 7))


def test_manifest_and_inspect_show_symbolic_dims(dyn):
    from mtcompile.cli import describe
    from mtcompile.runtime.manifest import Manifest

    sig = dyn.manifest.tenants["te"]
    assert sig.inputs[0].shape == ("batch", 3, 6, 6)
    assert sig.inputs[0].dims == {"batch": (1, BOUND)}
    assert sig.outputs[0].shape == ("batch", 5)
    assert dyn.manifest.tenants["te2"].inputs[0].dims == {"batch": (1, 4)}
    assert dyn.manifest.tenants["fx"].inputs[1].shape == ("n", 4)
    again = Manifest.from_json(dyn.manifest.to_json())
    assert again.tenants["ox"] == dyn.manifest.tenants["ox"]
    text = describe(dyn.manifest)
    assert "x: float32[batch, 3, 6, 6] (batch in [1, 8])" in text
    assert "dynamic dims at their upper bounds" in text


def test_memory_planned_at_the_bound(dyn):
    plan = dyn.graph.analyses["memory"].functions["run_all"]
    sizes = {s.tensor: s.size for s in plan.slots}
    # te's (batch, 4, 6, 6) float32 tensors: planned at batch = BOUND, te2's at 4
    assert BOUND * 4 * 6 * 6 * 4 in {sizes[n] for n in sizes if n.startswith("te.")}
    assert max(sizes[n] for n in sizes if n.startswith("te2.")) == 4 * 4 * 6 * 6 * 4
    mem = dyn.compile_report["build"]["memory"]["run_all"]
    assert mem["planned_tensors"] > 0 and mem["unplanned_tensors"] == 0
    assert mem["arena_bytes"] >= BOUND * 4 * 6 * 6 * 4


def test_dynamic_tenants_are_not_stacked(dyn):
    # te and te2 share the architecture; their batches are independent sizes
    assert not any(n.tenants == ("te", "te2") or "hfuse" in n.name for n in dyn.graph.nodes)


def test_symbolic_dim_without_bounds_is_named(models):
    with pytest.raises(TenantError, match=r"tenant 'o'.*input 'x' axis 0.*'batch' has no "
                                          r"bounds.*dim_bounds"):
        mtcompile.compile([Tenant("o", onnx_mlp(models["ox"]))])
    gm = torch.fx.symbolic_trace(models["ox"])
    with pytest.raises(TenantError, match=r"'n' has no bounds"):
        mtcompile.compile([Tenant("f", gm, input_shapes={"x": (("n", 6), "float32")})])
    with pytest.raises(TenantError, match=r"dim_bounds names \['m'\]"):
        mtcompile.compile([Tenant("f", gm, input_shapes={"x": (("n", 6), "float32")},
                                  dim_bounds={"n": (1, 4), "m": (1, 2)})])
    with pytest.raises(TenantError, match=r"expected \(lo, hi\)"):
        Tenant("f", gm, dim_bounds={"n": (4, 1)})


def test_torch_dim_without_max_is_refused(models):
    with pytest.raises(TenantError, match=r"tenant 'u'.*input 'x' axis 0.*'batch' has no bounds"):
        mtcompile.compile([Tenant("u", models["ox"], example_inputs=(x_of(0, 2, 6),),
                                  dynamic_shapes={"x": {0: Dim("batch", min=1)}})])


def test_tuning_and_streams_need_fixed_shapes(models):
    t = Tenant("te", models["ox"], example_inputs=(x_of(0, 2, 6),),
               dynamic_shapes={"x": {0: Dim("batch", min=1, max=4)}})
    with pytest.raises(MTCompileError, match="tune: tenants \\['te'\\] have symbolic"):
        tune([t], "/nonexistent-tuning-dir", trials=1)
    with pytest.raises(MTCompileError, match="several streams need fixed shapes"):
        mtcompile.compile([t], pass_options={"assign-streams": {"streams": 2}})


def test_spec_takes_dynamic_shapes_and_dim_bounds(tmp_path):
    from mtcompile.tools.spec import load_spec

    (tmp_path / "s.toml").write_text(
        '[[tenants]]\nname = "a"\nfactory = "mtcompile.models:mlp"\n'
        'dynamic_shapes = { x = { 0 = "batch" } }\ndim_bounds = { batch = [1, 16] }\n'
        '[[tenants]]\nname = "b"\nfactory = "mtcompile.models:mlp_fx"\n'
        'input_shapes = { x = [["n", 6], "float32"] }\ndim_bounds = { n = [2, 9] }\n')
    a, b = load_spec(tmp_path / "s.toml").tenants
    dim = a.dynamic_shapes["x"][0]
    assert (dim.__name__, dim.min, dim.max) == ("batch", 1, 16)
    assert b.input_shapes == {"x": (("n", 6), "float32")} and b.dim_bounds == {"n": (2, 9)}
    (tmp_path / "bad.toml").write_text(
        '[[tenants]]\nname = "a"\nfactory = "mtcompile.models:mlp"\n'
        'dynamic_shapes = { x = { 0 = "batch" } }\n')
    with pytest.raises(MTCompileError, match="dim 'batch' has no bounds"):
        load_spec(tmp_path / "bad.toml")


def test_saved_dynamic_bundle_runs_any_size(dyn, models, tmp_path):
    loaded = mtcompile.load(dyn.save(tmp_path / "dyn"))
    assert json.loads(loaded.manifest.to_json())["tenants"]["te"]["inputs"][0]["dims"] == {
        "batch": [1, BOUND]}
    for n in (1, 3):
        xs = inputs_of("te", n)
        np.testing.assert_allclose(loaded.run("te", *xs)[0], expected(models, "te", xs),
                                   atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="outside its bounds"):
        loaded.run("te", *inputs_of("te", BOUND + 1))


def test_a_shared_input_needs_a_fixed_shape(models):
    dyn = {"x": {0: Dim("batch", min=1, max=4)}}
    ts = [Tenant(n, MLP(i), example_inputs=(x_of(0, 2, 6),), dynamic_shapes=dyn,
                 shared_inputs={"x": "frame"}) for i, n in enumerate(("a", "b"))]
    with pytest.raises(TenantError, match="tenant 'a': shared input 'x' .'frame'. has dynamic "
                                          "dims f32\\[a_batch,6\\]; a shared input needs a fixed"):
        mtcompile.compile(ts)


@pytest.mark.slow  # builds the C++ driver (once, cached)
def test_driver_runs_any_size_and_refuses_past_the_bound(dyn, models, tmp_path):
    import subprocess

    from mtcompile.driver import command

    saved = dyn.save(tmp_path / "dyn")

    def drive(entry, given: dict, name: str):
        d, out = tmp_path / f"in_{name}", tmp_path / f"out_{name}"
        d.mkdir()
        out.mkdir()
        for t, xs in given.items():
            for spec, x in zip(dyn.manifest.tenants[t].inputs, xs, strict=True):
                np.save(d / f"{t}.{spec.name}.npy", np.asarray(x))
        return subprocess.run(command(saved, entry, d, out, 2), capture_output=True, text=True,
                              timeout=300), out

    sizes = {"te": 3, "te2": 1, "ox": BOUND, "fx": 5}
    given = {t: inputs_of(t, n) for t, n in sizes.items()}
    res, out = drive("run_all", given, "ok")
    assert res.returncode == 0, res.stderr
    for t in sizes:
        name = dyn.manifest.tenants[t].outputs[0].name
        np.testing.assert_allclose(np.load(out / f"{t}.{name}.npy"),
                                   expected(models, t, given[t]), atol=ATOL, rtol=0)
    res, _ = drive("te2", {"te2": inputs_of("te2", 5)}, "past")
    assert res.returncode == 3
    assert "tenant 'te2', input 'x': dim 0 ('batch') is 5, outside its bounds [1, 4]" in res.stderr


def test_build_cache_keys_dynamic_bounds(models, tmp_path):
    def tenant(hi):
        return Tenant("c", models["ox"], example_inputs=(x_of(0, 2, 6),),
                      dynamic_shapes={"x": {0: Dim("batch", min=1, max=hi)}})

    first = mtcompile.compile([tenant(4)], cache=tmp_path)
    again = mtcompile.compile([tenant(4)], cache=tmp_path)
    other = mtcompile.compile([tenant(6)], cache=tmp_path)
    assert not first.compile_report["cache"]["hit"] and again.compile_report["cache"]["hit"]
    assert not other.compile_report["cache"]["hit"]
    assert again.manifest.tenants["c"].inputs[0].dims == {"batch": (1, 4)}
    assert other.run("c", x_of(0, 6, 6))[0].shape == (6, 3)


def test_an_index_computed_inside_of_dynamic_shape_is_refused():
    class Pick(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 3)

        def forward(self, x):
            return self.emb(x.argmax(-1))

    t = Tenant("pick", Pick().eval(), example_inputs=(x_of(0, 2, 6),),
               dynamic_shapes={"x": {0: Dim("batch", min=1, max=4)}})
    with pytest.raises(MTCompileError, match=r"tenant 'pick'.*indices computed inside the model "
                                             r"of dynamic shape i32\[pick_batch\]"):
        mtcompile.compile([t])


def test_verify_and_profile_run_dynamic_tenants(dyn):
    # verify: the example inputs (batch 2), seeded ones at the bound where none are given
    report = dyn.verify(atol=ATOL)
    assert report["ok"], report
    prof = dyn.profile(repeat=1)
    assert set(prof["tenants"]) == {"te", "te2", "ox", "fx"}
