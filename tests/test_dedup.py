"""Shared inputs and the dedup pass: structure, numerics and the cases where nothing is shared."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import F23, F24, WKEY, W, attrs, linear_relu, seeded_input, torch_outputs

import mtcompile
from mtcompile import Tenant
from mtcompile.errors import InputError, SpecError, TenantError
from mtcompile.frontend.merge import merge
from mtcompile.ir.graph import INPUT, ConstRef, Graph, Node, Ref, TenantIO
from mtcompile.ir.parse import assert_graph, parse_graph
from mtcompile.pass_infra import PassContext
from mtcompile.passes.dedup import Dedup
from mtcompile.tools.spec import load_spec


def _twin_graph(shared_input: bool) -> Graph:
    """Tenants a and b compute relu(x @ W) alike; b also adds an exp. With `shared_input`
    both read one input node."""

    def tenant(t, x):
        return [
            Node(
                f"{t}.mm",
                "relax.matmul",
                (Ref(x), ConstRef(WKEY)),
                F23,
                (t,),
                attrs("out_dtype=float32"),
            ),
            Node(f"{t}.r", "relax.nn.relu", (Ref(f"{t}.mm"),), F23, (t,)),
        ]

    if shared_input:
        inputs = [Node("shared.x", INPUT, (), F24, ("a", "b"))]
        xa = xb = "shared.x"
    else:
        inputs = [Node("a.x", INPUT, (), F24, ("a",)), Node("b.x", INPUT, (), F24, ("b",))]
        xa, xb = "a.x", "b.x"
    nodes = [
        *inputs,
        *tenant("a", xa),
        *tenant("b", xb),
        Node("b.e", "relax.exp", (Ref("b.r"),), F23, ("b",)),
    ]
    tenants = {
        "a": TenantIO((("x", xa),), (Ref("a.r"),)),
        "b": TenantIO((("x", xb),), (Ref("b.r"), Ref("b.e"))),
    }
    g = Graph(tuple(nodes), tenants, {WKEY: W})
    g.verify()
    return g


def test_dedup_structure_shares_equal_work_on_a_shared_input():
    result = Dedup().run(_twin_graph(shared_input=True), PassContext())
    assert result.changed and result.info == {"removed_nodes": 2, "shared_nodes": 2}
    g = result.graph
    g.verify()
    # a's matmul and relu now serve b too; b's exp and outputs read them
    assert_graph(
        g,
        f"""
        tenant a(x=%shared.x)
        tenant b(x=%shared.x)
        %shared.x = input() {{tenant=a+b}} : f32[2,4]
        %a.mm = matmul(%shared.x, @{WKEY[:8]}) {{out_dtype=float32}} {{tenant=a+b}} : f32[2,3]
        %a.r = nn.relu(%a.mm) {{tenant=a+b}} : f32[2,3]
        %b.e = exp(%a.r) {{tenant=b}} : f32[2,3]
        return a: (%a.r)
        return b: (%a.r, %b.e)
    """,
    )


def test_dedup_structure_on_a_graph_written_as_text():
    """The same case with the input graph itself written as text (parsed back)."""
    g = parse_graph(
        f"""
        tenant a(x=%s.x)
        tenant b(x=%s.x)
        %s.x = input() {{tenant=a+b}} : f32[2,4]
        %a.mm = matmul(%s.x, @{WKEY[:8]}) {{out_dtype=float32}} {{tenant=a}} : f32[2,3]
        %b.mm = matmul(%s.x, @{WKEY[:8]}) {{out_dtype=float32}} {{tenant=b}} : f32[2,3]
        %b.mm2 = matmul(%s.x, @{WKEY[:8]}) {{out_dtype=float16}} {{tenant=b}} : f32[2,3]
        return a: (%a.mm)
        return b: (%b.mm, %b.mm2)
    """,
        {WKEY: W},
    )
    g.verify()
    out = Dedup().run(g, PassContext()).graph
    assert_graph(
        out,
        f"""
        tenant a(x=%s.x)
        tenant b(x=%s.x)
        %s.x = input() {{tenant=a+b}} : f32[2,4]
        %a.mm = matmul(%s.x, @{WKEY[:8]}) {{out_dtype=float32}} {{tenant=a+b}} : f32[2,3]
        %b.mm2 = matmul(%s.x, @{WKEY[:8]}) {{out_dtype=float16}} {{tenant=b}} : f32[2,3]
        return a: (%a.mm)
        return b: (%a.mm, %b.mm2)
    """,
    )


def test_dedup_negative_different_inputs_share_nothing():
    g = _twin_graph(shared_input=False)
    result = Dedup().run(g, PassContext())
    assert result.changed is False and result.graph is g


def test_dedup_negative_different_attrs_or_weights_share_nothing():
    g = _twin_graph(shared_input=True)
    other = replace_node(g, "b.mm", attrs=attrs("out_dtype=float16"))
    assert Dedup().run(other, PassContext()).changed is False


def replace_node(g: Graph, name: str, **changes) -> Graph:
    from dataclasses import replace

    return Graph(
        tuple(replace(n, **changes) if n.name == name else n for n in g.nodes),
        g.tenants,
        g.constants,
    )


def _mlp_pair(same_weights: bool, shared: bool):
    m1, (x,) = linear_relu(0)
    m2, _ = linear_relu(0 if same_weights else 1)
    share = {"x": "frame"} if shared else {}
    return [
        Tenant("a", m1, example_inputs=(x,), shared_inputs=share),
        Tenant("b", m2, example_inputs=(x,), shared_inputs=share),
    ]


@pytest.mark.slow  # compiles a bundle of its own
def test_dedup_numerics_shared_backbone_runs_once_and_matches_torch():
    tenants = _mlp_pair(same_weights=True, shared=True)
    b = mtcompile.compile(tenants)
    rec = {r["name"]: r for r in b.compile_report["passes"]}
    assert rec["dedup"]["changed"] and rec["dedup"]["run_all"]["shared_nodes"] >= 3
    assert all(len(n.tenants) == 2 for n in b.graph.nodes)  # everything is shared
    x = tenants[0].example_inputs[0]
    want = torch_outputs(tenants[0].model, (x,))[0]
    out = b.run_all({"a": (x,), "b": (x,)})
    np.testing.assert_allclose(out["a"][0], want, atol=1e-5)
    np.testing.assert_allclose(out["b"][0], want, atol=1e-5)
    assert b.verify()["ok"]


@pytest.mark.slow  # compiles a bundle of its own
def test_dedup_numerics_different_weights_stay_apart():
    tenants = _mlp_pair(same_weights=False, shared=True)
    b = mtcompile.compile(tenants, passes=["dedup", "eliminate-dead-nodes"])
    assert not any(len(n.tenants) > 1 for n in b.graph.nodes if n.op != INPUT)
    x = tenants[0].example_inputs[0]
    out = b.run_all({"a": (x,), "b": (x,)})
    np.testing.assert_allclose(out["b"][0], torch_outputs(tenants[1].model, (x,))[0], atol=1e-5)
    assert not np.allclose(out["a"][0], out["b"][0])


@pytest.mark.slow  # compiles a bundle of its own
def test_shared_input_is_one_run_all_parameter():
    b = mtcompile.compile(_mlp_pair(same_weights=False, shared=True))
    assert b.manifest.run_all_inputs == ((("a", "x"), ("b", "x")),)
    assert b.signature("b").inputs[0].shared_as == "frame"
    x = seeded_input(1, 2, 8)
    with pytest.raises(InputError, match="share input 'x'/'x' but were given different values"):
        b.run_all({"a": (x,), "b": (x + 1,)})
    # each tenant's own entry still takes its own input
    assert b.run("b", x)[0].shape == (2, 4)


@pytest.mark.slow  # compiles a bundle of its own, runs the driver
def test_the_driver_refuses_different_values_for_a_shared_input_as_python_does(tmp_path):
    """The check lives in the core: mtcompile-run used the first tenant's file silently."""
    import subprocess

    from mtcompile.driver import command

    b = mtcompile.compile(_mlp_pair(same_weights=False, shared=True))
    b.save(tmp_path / "b")
    x = seeded_input(1, 2, 8)
    with pytest.raises(InputError) as e:
        mtcompile.load(tmp_path / "b").run_all({"a": (x,), "b": (x + 1,)})
    for d in ("in", "out"):
        (tmp_path / d).mkdir()
    np.save(tmp_path / "in" / "a.x.npy", x.numpy())
    np.save(tmp_path / "in" / "b.x.npy", x.numpy() + 1)
    cmd = command(tmp_path / "b", "run_all", tmp_path / "in", tmp_path / "out")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"mtcompile-run: {e.value}"
    np.save(tmp_path / "in" / "b.x.npy", x.numpy())  # the same values: it runs
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_shared_inputs_must_agree_on_type():
    m, (x,) = linear_relu(0)
    conv = torch.nn.Conv2d(3, 2, 1).eval()
    tenants = [
        Tenant("a", m, example_inputs=(x,), shared_inputs={"x": "frame"}),
        Tenant(
            "b", conv, example_inputs=(torch.zeros(1, 3, 4, 4),), shared_inputs={"input": "frame"}
        ),
    ]
    with pytest.raises(
        TenantError,
        match=r"shared input 'frame': tenant 'a' input 'x' is "
        r"f32\[2,8\] but tenant 'b' input 'input' is f32\[1,3,4,4\]",
    ):
        mtcompile.compile(tenants)


def test_shared_inputs_must_name_an_input():
    m, (x,) = linear_relu(0)
    with pytest.raises(
        TenantError,
        match=r"tenant 'a': shared_inputs names 'y', which is not an "
        r"input \(inputs: \['x'\]\)",
    ):
        mtcompile.compile([Tenant("a", m, example_inputs=(x,), shared_inputs={"y": "frame"})])
    with pytest.raises(TenantError, match="shared input name '1bad'"):
        Tenant("a", m, example_inputs=(x,), shared_inputs={"x": "1bad"})


def test_merge_unifies_declared_inputs():
    from mtcompile.frontend.importers import import_tenant
    from mtcompile.frontend.lift import lift

    graphs = []
    for t in _mlp_pair(same_weights=False, shared=True):
        it = import_tenant(t)
        graphs.append(lift(it.mod["main"], t.name, it.input_names))
    g = merge(graphs, {"a": {"x": "frame"}, "b": {"x": "frame"}})
    inputs = [n for n in g.nodes if n.op == INPUT]
    assert [(n.name, n.tenants) for n in inputs] == [("shared.frame", ("a", "b"))]
    assert g.tenants["a"].inputs == g.tenants["b"].inputs == (("x", "shared.frame"),)


def test_spec_shared_inputs(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[[tenants]]\nname = "a"\nfactory = "mtcompile.models:mlp"\n'
        "args = { batch = 2, d_in = 8, hidden = 8, d_out = 4 }\n"
        'shared_inputs = { x = "frame" }\n'
    )
    assert load_spec(path).tenants[0].shared_inputs == {"x": "frame"}
    path.write_text('[[tenants]]\nname = "a"\nonnx = "x.onnx"\nshared_inputs = 3\n')
    with pytest.raises(SpecError, match="shared_inputs must be a table"):
        load_spec(path)


@pytest.mark.slow
def test_shared_backbone_set_runs_the_backbone_once():
    from mtcompile.models import get_set

    tenants = get_set("shared-backbone", n=3)
    with_dedup = mtcompile.compile(tenants)
    x = [np.asarray(tenants[0].example_inputs[0])]
    convs = [s for s, _ in with_dedup.trace("run_all", x)[0] if "conv2d" in s]
    alone = [s for s, _ in with_dedup.trace("head0", x)[0] if "conv2d" in s]
    assert len(convs) == len(alone) == 8  # three tenants, one backbone's worth of convs
    assert with_dedup.graph.stats()["nodes"] < sum(
        len(with_dedup.graph.tenant_nodes(t.name)) for t in tenants
    )
    assert with_dedup.verify()["ok"]
