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
from mtcompile.analysis.memory import MemoryPlan
from mtcompile.api import tune
from mtcompile.errors import IndexOutOfRangeError, InputError, MTCompileError, TenantError

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
    torch.onnx.export(
        model,
        (torch.zeros(2, 6),),
        f,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
        dynamo=False,
    )
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
    return mtcompile.compile(
        [
            Tenant(
                "te",
                models["te"],
                example_inputs=(x_of(0, 2, 3, 6, 6),),
                dynamic_shapes={"x": {0: Dim("batch", min=1, max=BOUND)}},
            ),
            Tenant(
                "te2",
                models["te2"],
                example_inputs=(x_of(0, 2, 3, 6, 6),),
                dynamic_shapes={"x": {0: Dim("batch", min=1, max=4)}},
            ),
            Tenant("ox", onnx_mlp(models["ox"]), dim_bounds={"batch": (1, BOUND)}),
            Tenant(
                "fx",
                torch.fx.symbolic_trace(models["fx"]),
                input_shapes={"x": (("n", 6), "float32"), "y": (("n", 4), "float32")},
                dim_bounds={"n": (1, BOUND)},
            ),
        ],
        name="dyn",
    )


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
@pytest.mark.slow  # compiles `dyn`
def test_run_any_size_within_bounds(dyn, models, tenant):
    for n in SIZES:
        xs = inputs_of(tenant, n, seed=n)
        (out,) = dyn.run(tenant, *xs)
        assert out.shape[0] == n
        np.testing.assert_allclose(out, expected(models, tenant, xs), atol=ATOL, rtol=0)


@pytest.mark.slow  # compiles `dyn`
def test_run_all_each_tenant_its_own_size(dyn, models):
    for sizes in (
        {"te": 1, "te2": 4, "ox": 5, "fx": BOUND},
        {"te": BOUND, "te2": 3, "ox": 1, "fx": 5},
    ):
        given = {t: inputs_of(t, n, seed=7) for t, n in sizes.items()}
        outs = dyn.run_all(given)
        for t, n in sizes.items():
            assert outs[t][0].shape[0] == n
            np.testing.assert_allclose(outs[t][0], expected(models, t, given[t]), atol=ATOL, rtol=0)


@pytest.mark.slow  # compiles `dyn`
def test_size_past_the_bound_is_refused(dyn):
    with pytest.raises(
        InputError,
        match=r"tenant 'te2', input 'x': dim 0 \('batch'\) is 5, "
        r"outside its bounds \[1, 4\]",
    ):
        dyn.run("te2", *inputs_of("te2", 5))
    with pytest.raises(InputError, match=r"tenant 'ox'.*dim 0 \('batch'\) is 9.*\[1, 8\]"):
        dyn.run_all(
            {**{t: inputs_of(t, 1) for t in ("te", "te2", "fx")}, "ox": inputs_of("ox", BOUND + 1)}
        )
    with pytest.raises(InputError, match="dim 'n' is 2 in input 'x'.*but 3 in input 'y'"):
        dyn.run("fx", x_of(0, 2, 6), x_of(0, 3, 4))
    with pytest.raises(InputError, match=r"expected float32\[batch, 3, 6, 6\]"):
        dyn.run("te", x_of(0, 2, 3, 6, 7))


@pytest.mark.slow  # compiles `dyn`
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


@pytest.mark.slow  # compiles `dyn`
def test_memory_planned_at_the_bound(dyn):
    plan = dyn.analyses.get("run_all", MemoryPlan).functions["run_all"]
    sizes = {s.tensor: s.size for s in plan.slots}
    # te's (batch, 4, 6, 6) float32 tensors: planned at batch = BOUND, te2's at 4
    assert BOUND * 4 * 6 * 6 * 4 in {sizes[n] for n in sizes if n.startswith("te.")}
    assert max(sizes[n] for n in sizes if n.startswith("te2.")) == 4 * 4 * 6 * 6 * 4
    mem = dyn.compile_report["build"]["memory"]["run_all"]
    assert mem["planned_tensors"] > 0 and mem["unplanned_tensors"] == 0
    assert mem["arena_bytes"] >= BOUND * 4 * 6 * 6 * 4


@pytest.mark.slow  # compiles `dyn`
def test_dynamic_tenants_are_not_stacked(dyn):
    # te and te2 share the architecture; their batches are independent sizes
    assert not any(n.tenants == ("te", "te2") or "hfuse" in n.name for n in dyn.graph.nodes)


def test_symbolic_dim_without_bounds_is_named(models):
    with pytest.raises(
        TenantError,
        match=r"tenant 'o'.*input 'x' axis 0.*'batch' has no "
        r"bounds.*dim_bounds",
    ):
        mtcompile.compile([Tenant("o", onnx_mlp(models["ox"]))])
    gm = torch.fx.symbolic_trace(models["ox"])
    with pytest.raises(TenantError, match=r"'n' has no bounds"):
        mtcompile.compile([Tenant("f", gm, input_shapes={"x": (("n", 6), "float32")})])
    with pytest.raises(TenantError, match=r"dim_bounds names \['m'\]"):
        mtcompile.compile(
            [
                Tenant(
                    "f",
                    gm,
                    input_shapes={"x": (("n", 6), "float32")},
                    dim_bounds={"n": (1, 4), "m": (1, 2)},
                )
            ]
        )
    with pytest.raises(TenantError, match=r"expected \(lo, hi\)"):
        Tenant("f", gm, dim_bounds={"n": (4, 1)})


def test_torch_dim_without_max_is_refused(models):
    with pytest.raises(TenantError, match=r"tenant 'u'.*input 'x' axis 0.*'batch' has no bounds"):
        mtcompile.compile(
            [
                Tenant(
                    "u",
                    models["ox"],
                    example_inputs=(x_of(0, 2, 6),),
                    dynamic_shapes={"x": {0: Dim("batch", min=1)}},
                )
            ]
        )


def test_tuning_and_streams_need_fixed_shapes(models):
    t = Tenant(
        "te",
        models["ox"],
        example_inputs=(x_of(0, 2, 6),),
        dynamic_shapes={"x": {0: Dim("batch", min=1, max=4)}},
    )
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
        'input_shapes = { x = [["n", 6], "float32"] }\ndim_bounds = { n = [2, 9] }\n'
    )
    a, b = load_spec(tmp_path / "s.toml").tenants
    dim = a.dynamic_shapes["x"][0]
    assert (dim.__name__, dim.min, dim.max) == ("batch", 1, 16)
    assert b.input_shapes == {"x": (("n", 6), "float32")} and b.dim_bounds == {"n": (2, 9)}
    (tmp_path / "bad.toml").write_text(
        '[[tenants]]\nname = "a"\nfactory = "mtcompile.models:mlp"\n'
        'dynamic_shapes = { x = { 0 = "batch" } }\n'
    )
    with pytest.raises(MTCompileError, match="dim 'batch' has no bounds"):
        load_spec(tmp_path / "bad.toml")


@pytest.mark.slow  # compiles `dyn`
def test_saved_dynamic_bundle_runs_any_size(dyn, models, tmp_path):
    loaded = mtcompile.load(dyn.save(tmp_path / "dyn"))
    assert json.loads(loaded.manifest.to_json())["tenants"]["te"]["inputs"][0]["dims"] == {
        "batch": [1, BOUND]
    }
    for n in (1, 3):
        xs = inputs_of("te", n)
        np.testing.assert_allclose(
            loaded.run("te", *xs)[0], expected(models, "te", xs), atol=ATOL, rtol=0
        )
    with pytest.raises(InputError, match="outside its bounds"):
        loaded.run("te", *inputs_of("te", BOUND + 1))


@pytest.mark.slow  # exports two models at a dynamic batch
def test_a_shared_input_needs_a_fixed_shape(models):
    dyn = {"x": {0: Dim("batch", min=1, max=4)}}
    ts = [
        Tenant(
            n,
            MLP(i),
            example_inputs=(x_of(0, 2, 6),),
            dynamic_shapes=dyn,
            shared_inputs={"x": "frame"},
        )
        for i, n in enumerate(("a", "b"))
    ]
    with pytest.raises(
        TenantError,
        match="tenant 'a': shared input 'x' .'frame'. has dynamic "
        "dims f32\\[a_batch,6\\]; a shared input needs a fixed",
    ):
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
        return subprocess.run(
            command(saved, entry, d, out, 2), capture_output=True, text=True, timeout=300
        ), out

    sizes = {"te": 3, "te2": 1, "ox": BOUND, "fx": 5}
    given = {t: inputs_of(t, n) for t, n in sizes.items()}
    res, out = drive("run_all", given, "ok")
    assert res.returncode == 0, res.stderr
    for t in sizes:
        name = dyn.manifest.tenants[t].outputs[0].name
        np.testing.assert_allclose(
            np.load(out / f"{t}.{name}.npy"), expected(models, t, given[t]), atol=ATOL, rtol=0
        )
    res, _ = drive("te2", {"te2": inputs_of("te2", 5)}, "past")
    assert res.returncode == 3
    assert "tenant 'te2', input 'x': dim 0 ('batch') is 5, outside its bounds [1, 4]" in res.stderr


@pytest.mark.slow  # compiles a bundle of its own
def test_build_cache_keys_dynamic_bounds(models, tmp_path):
    def tenant(hi):
        return Tenant(
            "c",
            models["ox"],
            example_inputs=(x_of(0, 2, 6),),
            dynamic_shapes={"x": {0: Dim("batch", min=1, max=hi)}},
        )

    first = mtcompile.compile([tenant(4)], cache=tmp_path)
    again = mtcompile.compile([tenant(4)], cache=tmp_path)
    other = mtcompile.compile([tenant(6)], cache=tmp_path)
    assert not first.compile_report["cache"]["hit"] and again.compile_report["cache"]["hit"]
    assert not other.compile_report["cache"]["hit"]
    assert again.manifest.tenants["c"].inputs[0].dims == {"batch": (1, 4)}
    assert other.run("c", x_of(0, 6, 6))[0].shape == (6, 3)


class Pick(nn.Module):
    """Embedding(6, 3) at the argmax of each row: an index computed inside the model, of
    shape (batch,)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            self.emb = nn.Embedding(6, 3)
        self.eval()

    def forward(self, x):
        return self.emb(x.argmax(-1))


class Double(nn.Module):
    """Embedding(60, 4) at 2 * i: an index of shape (batch * 3,) after flattening."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.emb = nn.Embedding(60, 4)
        self.eval()

    def forward(self, i):
        return self.emb(i * 2)


class SelectRows(nn.Module):
    """Rows of x at each row's argmax: a table whose extent is the batch itself."""

    def forward(self, x):
        return torch.index_select(x, 0, x.argmax(-1)) * 2.0


class RowsZeroAndThree(nn.Module):
    """Rows 0 and 3 of x (constant indices: valid only when the batch is > 3)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rows", torch.tensor([0, 3]))

    def forward(self, x):
        return torch.index_select(x, 0, self.rows) + 1.0


@pytest.fixture(scope="module")
def gathers():
    """A bundle whose gathers read at indices computed inside the model, of dynamic shape."""
    return mtcompile.compile(
        [
            Tenant(
                "pick",
                Pick(),
                example_inputs=(x_of(0, 1, 6),),
                dynamic_shapes={"x": {0: Dim("batch", min=1, max=4)}},
            ),
            Tenant(
                "dbl",
                Double(),
                example_inputs=(torch.tensor([[1, 2, 3]]),),
                dynamic_shapes={"i": {0: Dim("batch", min=1, max=BOUND)}},
            ),
            Tenant(
                "rows",
                SelectRows().eval(),
                example_inputs=(torch.eye(2, 6),),
                dynamic_shapes={"x": {0: Dim("n", min=1, max=BOUND)}},
            ),
            Tenant(
                "r03",
                RowsZeroAndThree().eval(),
                example_inputs=(x_of(0, 4, 6),),
                dynamic_shapes={"x": {0: Dim("n", min=1, max=BOUND)}},
            ),
        ],
        name="gathers",
    )


@pytest.mark.slow  # compiles `gathers`
def test_a_computed_index_of_dynamic_shape_is_checked_in_the_kernel(gathers):
    """Before: ``relax.take reads at indices computed inside the model of dynamic shape
    ...; their bounds check needs a fixed shape``. Now the check's loops run over the
    index's extent at the call: in-range indices give PyTorch's answer at every size, and
    one bad index anywhere (the last row at the bound too) raises like PyTorch's
    IndexError instead of reading past the table."""
    assert all(s.index_range is None for s in gathers.signature("dbl").inputs)
    for n in (1, 3, 4):
        x = x_of(n, n, 6)
        with torch.no_grad():
            ref = Pick()(x).numpy()
        np.testing.assert_allclose(gathers.run("pick", x)[0], ref, atol=ATOL, rtol=0)
    model = Double()
    for n in (1, 5, BOUND):
        i = torch.randint(0, 30, (n, 3), generator=torch.Generator().manual_seed(n))
        np.testing.assert_array_equal(gathers.run("dbl", i)[0], model(i).detach().numpy())
        for v in (30, -3, 10**6):
            bad = i.clone()
            bad[-1, 2] = v
            with pytest.raises(IndexError):  # what PyTorch raises
                model(bad)
            with pytest.raises(
                IndexOutOfRangeError,
                match=r"^tenant 'dbl', input 'i': index out of range: take .* "
                r"reads a table of 60 rows along axis 0, so its indices "
                r"must be in \[0, 60\)$",
            ):
                gathers.run("dbl", bad)
    # run_all checks too, and the bundle still works afterwards
    good = {
        "pick": (x_of(0, 2, 6),),
        "dbl": (torch.tensor([[1, 2, 3]] * 3),),
        "rows": (torch.eye(3, 6),),
        "r03": (x_of(0, 4, 6),),
    }
    with pytest.raises(IndexOutOfRangeError, match="tenant 'dbl'"):
        gathers.run_all({**good, "dbl": (torch.tensor([[1, 40, 3]] * 3),)})
    gathers.run_all(good)


@pytest.mark.slow  # compiles `gathers`
def test_a_table_of_dynamic_extent_is_checked_at_the_extent_of_the_call(gathers):
    """index_select(x, 0, x.argmax(-1)): rows 0..5 exist only when the batch is > 5.
    Before: index_reads died of ``int() argument must be ... not 'Sym'``."""
    model = SelectRows()
    for n in (6, BOUND):
        x = torch.eye(n, 6)
        np.testing.assert_array_equal(gathers.run("rows", x)[0], model(x).numpy())
    x = torch.zeros(3, 6)
    x[0, 5] = 1.0  # row 5 of a batch of 3
    with pytest.raises(IndexError):
        model(x)
    with pytest.raises(
        IndexOutOfRangeError,
        match=r"^tenant 'rows', input 'x': index out of "
        r"range: take .* reads a table of n rows "
        r"along axis 0, so its indices must be in "
        r"\[0, n\)$",
    ):
        gathers.run("rows", x)
    # constant indices into such a table: valid at some sizes only, so checked at each call
    model = RowsZeroAndThree()
    for n in (4, BOUND):
        x = x_of(n, n, 6)
        np.testing.assert_array_equal(gathers.run("r03", x)[0], model(x).numpy())
    with pytest.raises(IndexError):
        model(x_of(0, 3, 6))
    with pytest.raises(
        IndexOutOfRangeError,
        match=r"^tenant 'r03', a constant index: index "
        r"out of range: take .* reads a table of n "
        r"rows along axis 0",
    ):
        gathers.run("r03", x_of(0, 3, 6))


@pytest.mark.slow  # compiles `dyn`
def test_verify_and_profile_run_dynamic_tenants(dyn):
    # verify: the example inputs (batch 2), seeded ones at the bound where none are given
    report = dyn.verify(atol=ATOL)
    assert report["ok"], report
    prof = dyn.profile(repeat=1)
    assert set(prof["tenants"]) == {"te", "te2", "ox", "fx"}


# --------------------------------------------------------------------------- batch-1 examples


class Widths(nn.Module):
    """x: (n, 6), y: (2n, 4), z: (3, 4) fixed."""

    def forward(self, x, y, z):
        return x.sum(-1, keepdim=True) + y.reshape(-1, 2, 4).sum(1)[:, :1] + z.sum()


def test_batch_1_examples_are_widened_to_size_2_within_the_bounds():
    """torch.export fixes a dynamic dim whose example has size 1 ("Constraints violated
    (batch)!"): the export runs on copies widened along their dynamic dims (a derived dim
    with them), the user's tensors stay as given. No TVM involved."""
    from mtcompile.frontend.importers import dynamic_axes, widen_examples, widened_sizes

    batch = Dim("batch", min=1, max=16)
    x, y, z = x_of(0, 1, 6), x_of(1, 2, 4), x_of(2, 3, 4)
    spec = {"x": {0: batch}, "y": {0: 2 * batch}, "z": None}
    dims = dynamic_axes(Widths(), (x, y, z), spec)
    assert [(a.index, a.input, a.axis) for a in dims] == [(0, "x", 0), (1, "y", 0)]
    assert widened_sizes((x, y, z), dims) == {(0, 0): 2, (1, 0): 4}
    wx, wy, wz = widen_examples((x, y, z), widened_sizes((x, y, z), dims))
    assert wx.shape == (2, 6) and wy.shape == (4, 4) and wz is z
    assert x.shape == (1, 6) and y.shape == (2, 4)  # untouched
    torch.testing.assert_close(wx[1], x[0])
    # by position, a Dim whose min is above 2, a max of 2, examples already >= 2: as given
    assert widened_sizes((x,), dynamic_axes(MLP(0), (x,), ({0: Dim("b", min=3, max=9)},))) == {
        (0, 0): 3
    }
    assert widened_sizes((x,), dynamic_axes(MLP(0), (x,), {"x": {0: Dim("b", max=2)}})) == {
        (0, 0): 2
    }
    assert (
        widened_sizes((x_of(0, 3, 6),), dynamic_axes(MLP(0), (x_of(0, 3, 6),), {"x": {0: batch}}))
        == {}
    )
    torch.export.export(Widths(), (wx, wy, wz), dynamic_shapes=spec)  # exports now


def test_a_batch_1_example_imports_and_refuses_past_its_bound():
    from mtcompile.frontend.importers import import_tenant

    x = x_of(0, 1, 6)
    t = Tenant(
        "one", MLP(2), example_inputs=(x,), dynamic_shapes={"x": {0: Dim("batch", min=1, max=16)}}
    )
    imported = import_tenant(t)
    assert str(imported.mod["main"].params[0].ty.shape[0]) == "one_batch"
    assert x.shape == (1, 6)


class FixedTwo(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1) * 2


class Twice(nn.Module):
    def forward(self, y):
        return y * 2


def test_an_export_that_still_fixes_the_dim_says_what_to_give():
    from mtcompile.frontend.importers import import_tenant

    batch = Dim("batch", min=1, max=16)
    with pytest.raises(
        TenantError,
        match=r"tenant 'two': torch.export failed: UserError: "
        r"Constraints violated \(batch\)!; Dim 'batch': the "
        r"model's code fixes input 'x' axis 0 to 2, so it "
        r"cannot vary: drop it from dynamic_shapes",
    ):
        import_tenant(
            Tenant(
                "two", FixedTwo(), example_inputs=(x_of(0, 1, 6),), dynamic_shapes={"x": {0: batch}}
            )
        )
    # only a derived dim: its root's example is 1 and nothing says how to widen it
    with pytest.raises(
        TenantError,
        match=r"Constraints violated \(2\*batch\)!; Dim '2\*batch': "
        r"torch.export fixes a dynamic dim whose example has "
        r"size 0 or 1: give example inputs with batch in "
        r"\[2, 16\]: size 2\*batch \(e.g. 4\) along input 'y' "
        r"axis 0",
    ):
        import_tenant(
            Tenant(
                "der",
                Twice(),
                example_inputs=(x_of(0, 2, 6),),
                dynamic_shapes={"y": {0: 2 * batch}},
            )
        )
    with pytest.raises(
        TenantError,
        match=r"give example inputs with batch in \[2, 16\]: size "
        r"in \[2, 16\] along input 'y' axis 0",
    ):
        import_tenant(
            Tenant(
                "empty", Twice(), example_inputs=(x_of(0, 0, 6),), dynamic_shapes={"y": {0: batch}}
            )
        )


class SliceArange(nn.Module):
    """torch.diff over the last axis (slices at axis -1) plus the row number
    (arange(0, batch): a size variable as a value)."""

    def forward(self, x):
        return torch.diff(x, dim=-1) + torch.arange(x.shape[0]).unsqueeze(1)


@pytest.mark.slow  # compiles a bundle of its own
def test_negative_slice_axes_and_size_values_at_a_dynamic_batch():
    """Before: TVM's legalization of a slice at axis -1 of a tensor of symbolic shape
    failed ("axis < src_tensor_dim (-1 vs. 2)"), and ``arange(0, batch)`` failed to lift
    ("reads t_batch, which is not defined before"): both in transformers' GPT-2."""
    b = mtcompile.compile(
        [
            Tenant(
                "sa",
                SliceArange(),
                example_inputs=(x_of(0, 1, 6),),
                dynamic_shapes={"x": {0: Dim("batch", min=1, max=BOUND)}},
            )
        ]
    )
    for n in (1, 5):
        x = x_of(n, n, 6)
        np.testing.assert_allclose(b.run("sa", x)[0], SliceArange()(x).numpy(), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- real models


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_transformers_at_a_dynamic_batch_from_a_batch_1_example(name):
    """transformers' BERT (position and token-type ids computed inside the model: gathers
    at indices of shape (batch, 16)) and GPT-2 (its attention decomposed at a batch > 1,
    slices at axis -1, arange(0, batch)) from a batch-1 example, Dim batch in [1, 16]."""
    from mtcompile.models.hf import real_model

    model, (ids,) = real_model(name)
    assert ids.shape == (1, 16)
    b = mtcompile.compile(
        [
            Tenant(
                name,
                model,
                example_inputs=(ids,),
                dynamic_shapes={"x": {0: Dim("batch", min=1, max=16)}},
            )
        ]
    )
    for n in (1, 5, 16):
        x = torch.randint(0, 512, (n, 16), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ref = model(x).numpy()
        (out,) = b.run(name, x)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    with pytest.raises(
        InputError,
        match=rf"tenant '{name}', input 'x': dim 0 \('batch'\) is "
        r"17, outside its bounds \[1, 16\]",
    ):
        b.run(name, torch.zeros(17, 16, dtype=torch.int64))
