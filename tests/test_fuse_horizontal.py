"""fuse-horizontal: structure, numerics, the cases where it must not fire, per-tenant entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LinearReLU, linear_relu, seeded_input, torch_outputs

import mtcompile
from mtcompile import Tenant
from mtcompile.errors import InputError
from mtcompile.frontend.importers import import_tenant
from mtcompile.frontend.lift import lift
from mtcompile.frontend.merge import merge
from mtcompile.native import table
from mtcompile.pass_infra import PassContext
from mtcompile.passes.fuse_horizontal import FuseHorizontal

# the same kernel decisions as the default pipeline, without horizontal or vertical fusion
NO_FUSION = ["dedup", "eliminate-dead-nodes", "fold-batch-norm", "offload-library"]


def _merged(tenants):
    graphs = []
    for t in tenants:
        it = import_tenant(t)
        graphs.append(lift(it.mod["main"], t.name, it.input_names))
    return merge(graphs)


def _pair(seed_b: int = 1, width_b: int = 8):
    a, (xa,) = linear_relu(0)
    b = LinearReLU(seed_b) if width_b == 8 else torch.nn.Linear(width_b, 4).eval()
    xb = seeded_input(7, 2, width_b)
    return [Tenant("a", a, example_inputs=(xa,)), Tenant("b", b, example_inputs=(xb,))]


def test_structure_two_linear_tenants_become_one_batched_chain():
    g = _merged(_pair())
    result = FuseHorizontal().run(g, PassContext())
    assert result.changed
    assert result.info["groups"] == [["a", "b"]]
    out = result.graph
    out.verify()
    text = str(out)
    # the inputs are stacked once, the weights are stacked constants, the chain runs batched
    assert "stack((%a.x, %b.x)) {axis=0} {tenant=a+b} : f32[2,2,8]" in text
    assert "matmul(" in text and "{tenant=a+b} : f32[2,2,4]" in text
    # each tenant's result is split back (take on the stacked axis) exactly once
    assert result.info["splits"] == 2
    assert [n.op for n in out.nodes if n.name.endswith(".split")] == ["relax.take"] * 2
    assert not any(n.tenants == ("a",) and n.op == "relax.matmul" for n in out.nodes)


def test_negative_different_shapes_are_not_grouped():
    g = _merged(_pair(width_b=6))
    result = FuseHorizontal().run(g, PassContext())
    assert not result.changed and result.graph is g


def test_negative_min_group_option():
    g = _merged(_pair())
    assert not FuseHorizontal(min_group=3).run(g, PassContext()).changed


def test_ops_option_limits_what_is_batched():
    g = _merged(_pair())
    only_mm = FuseHorizontal(ops=("relax.matmul",)).run(g, PassContext()).graph
    batched = {n.op for n in only_mm.nodes if n.name.startswith("hfuse")}
    assert "relax.matmul" in batched and "relax.nn.relu" not in batched
    assert not FuseHorizontal(ops=("relax.nn.conv2d",)).run(g, PassContext()).changed


@pytest.mark.slow  # imports and fuses a dozen tenants
def test_max_group_splits_large_groups():
    tenants = [
        Tenant(f"t{i}", LinearReLU(i), example_inputs=(seeded_input(i, 2, 8),)) for i in range(5)
    ]
    result = FuseHorizontal(max_group=2).run(_merged(tenants), PassContext())
    assert result.info["groups"] == [["t0", "t1"], ["t2", "t3"]]  # t4 is left alone


@pytest.mark.slow  # compiles bundles of its own
def test_numerics_match_torch_through_run_all_and_entries_stay_unfused():
    tenants = _pair()
    bundle = mtcompile.compile(tenants)
    assert bundle.verify()["ok"]
    out = bundle.run_all({t.name: t.example_inputs for t in tenants})
    for t in tenants:
        np.testing.assert_allclose(
            out[t.name][0], torch_outputs(t.model, t.example_inputs)[0], atol=1e-5
        )
    # a tenant's own entry still runs from its own inputs only (no stacking of others)
    x = seeded_input(11, 2, 8)
    np.testing.assert_allclose(
        bundle.run("b", x)[0], torch_outputs(tenants[1].model, (x,))[0], atol=1e-5
    )
    assert [i.to_dict() for i in bundle.manifest.tenants["a"].inputs] == [
        {"name": "x", "shape": [2, 8], "dtype": "float32"}
    ]


@pytest.mark.slow  # compiles bundles of its own
def test_run_all_launches_fewer_kernels():
    tenants = [
        Tenant(f"t{i}", LinearReLU(i), example_inputs=(seeded_input(i, 2, 8),)) for i in range(4)
    ]
    # with epilogues each tenant's Linear+ReLU is already one native call (see the
    # offload-library tests): stacking is measured against the unfolded form
    no_epilogues = {"offload-library": {"epilogues": False}}
    fused = mtcompile.compile(tenants, pass_options=no_epilogues)
    plain = mtcompile.compile(tenants, passes=NO_FUSION, pass_options=no_epilogues)
    args = [np.asarray(t.example_inputs[0]) for t in tenants]

    def kernels(b):
        return sum(1 for s, _ in b.trace("run_all", args)[0] if not s.startswith("vm.builtin"))

    assert kernels(fused) < kernels(plain)
    assert fused.verify()["ok"]


@pytest.mark.slow  # compiles bundles of its own
def test_embedding_tables_are_offset_per_tenant_and_ranges_still_checked():
    class Emb(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.emb = torch.nn.Embedding(10, 4)
                self.fc = torch.nn.Linear(4, 3)
            self.eval()

        def forward(self, ids):
            return torch.softmax(self.fc(self.emb(ids)), dim=-1)

    ids = torch.tensor([[1, 9, 0]])
    tenants = [Tenant(f"e{i}", Emb(i), example_inputs=(ids,)) for i in range(3)]
    bundle = mtcompile.compile(tenants)
    rec = {p["name"]: p for p in bundle.compile_report["passes"]}["fuse-horizontal"]
    assert rec["groups"] == [["e0", "e1", "e2"]]
    assert any(n.op == "relax.take" and n.name.startswith("hfuse") for n in bundle.graph.nodes)
    assert bundle.verify()["ok"]
    # an id past the table would read the next tenant's rows in the stacked table: refused
    with pytest.raises(InputError, match=r"must be in \[0, 10\)"):
        bundle.run_all({"e0": (ids,), "e1": (torch.tensor([[1, 10, 0]]),), "e2": (ids,)})


@pytest.mark.slow
def test_same_arch_set_is_fused_whole():
    from mtcompile.models import get_set

    tenants = get_set("same-arch", n=4)
    fused, plain = mtcompile.compile(tenants), mtcompile.compile(tenants, passes=NO_FUSION)
    rec = {p["name"]: p for p in fused.compile_report["passes"]}["fuse-horizontal"]
    assert rec["groups"] == [["enc0", "enc1", "enc2", "enc3"]] and rec["splits"] == 4
    args = [np.asarray(t.example_inputs[0]) for t in tenants]

    def kernels(b):
        return sum(1 for s, _ in b.trace("run_all", args)[0] if not s.startswith("vm.builtin"))

    # 168 -> 46 when this was written; 144 -> 49 since epilogues and row kernels (both sides)
    assert kernels(fused) * 2.5 < kernels(plain)
    result = fused.verify()
    assert result["ok"], result


@pytest.mark.slow
def test_fused_dense_layers_run_on_stacked_packed_weights():
    """Same-architecture tenants fused horizontally run their dense layers as one packed
    dense call on the stacked packed weights (no batched BLAS matmul in run_all), their
    biases and activations folded into it, and run_all still gives each tenant's own
    numbers."""
    from mtcompile.models import mlp
    from mtcompile.runtime import profile
    from mtcompile.runtime.inputs import run_all_arrays

    tenants = []
    for i in range(3):
        model, inputs = mlp(seed=i, batch=5, d_in=48, hidden=80, d_out=24)
        tenants.append(Tenant(f"m{i}", model, example_inputs=inputs))
    b = mtcompile.compile(tenants)
    inputs = {t.name: tuple(np.asarray(x) for x in t.example_inputs) for t in tenants}
    assert b.verify(inputs)["ok"]
    m = b.manifest
    arrays = run_all_arrays(inputs, m.tenants, m.tenant_order, m.run_all_inputs)
    calls = {
        k["name"]: k["calls"]
        for k in profile.kernel_table(b.trace("run_all", arrays, 1))["kernels"]
    }
    dense = [c for c in calls if c.startswith("mtcompile.native.dense_packed")]
    assert dense and sum(calls[c] for c in dense) == 2, calls  # two layers, each fused once
    # each tenant's own bias joins the stacked call (one per weight), the ReLU its epilogue
    assert all(table.SYMBOLS[c].bias for c in dense), calls
    assert any(table.SYMBOLS[c].epilogue == "relu" for c in dense), calls
    assert not any(c.startswith("mtcompile.native.matmul") for c in calls), calls
