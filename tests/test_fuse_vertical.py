"""fuse-vertical: fusion groups as a decision on our graph, one kernel each after lowering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import F23, F24, WKEY, W, attrs, seeded_input, torch_outputs

import mtcompile
from mtcompile import Tenant
from mtcompile.ir.graph import INPUT, ConstRef, Graph, Node, Ref, TenantIO, TensorTy, const_key
from mtcompile.ir.parse import assert_graph
from mtcompile.pass_infra import PassContext
from mtcompile.passes.fuse_vertical import FuseVertical
from mtcompile.passes.offload_library import OffloadLibrary

# the default pipeline up to fuse-vertical: TVM's FuseOps decides the groups
WITHOUT = ["dedup", "fuse-horizontal", "eliminate-dead-nodes", "fold-batch-norm", "offload-library"]


def _chain(extra_user: bool = False) -> Graph:
    """x -> matmul(W) -> add(b) -> relu -> sum -> exp; optionally relu also returned."""
    b = np.ones(3, np.float32)
    bkey = const_key(b)
    f2 = TensorTy((2,), "float32")
    nodes = [
        Node("t.x", INPUT, (), F24, ("t",)),
        Node(
            "t.mm",
            "relax.matmul",
            (Ref("t.x"), ConstRef(WKEY)),
            F23,
            ("t",),
            attrs("out_dtype=float32"),
        ),
        Node("t.add", "relax.add", (Ref("t.mm"), ConstRef(bkey)), F23, ("t",)),
        Node("t.relu", "relax.nn.relu", (Ref("t.add"),), F23, ("t",)),
        Node("t.sum", "relax.sum", (Ref("t.relu"),), f2, ("t",), attrs("axis=[1]")),
        Node("t.exp", "relax.exp", (Ref("t.sum"),), f2, ("t",)),
    ]
    outs = (Ref("t.exp"), Ref("t.relu")) if extra_user else (Ref("t.exp"),)
    g = Graph(tuple(nodes), {"t": TenantIO((("x", "t.x"),), outs)}, {WKEY: W, bkey: b})
    g.verify()
    return g


def groups(g: Graph) -> list[list[str]]:
    out: dict[str, list[str]] = {}
    for n in g.nodes:
        if n.group:
            out.setdefault(n.group, []).append(n.name.split(".")[1])
    return list(out.values())


B3KEY = const_key(np.ones(3, np.float32))  # _chain's bias


def test_structure_tvm_matmul_takes_its_elementwise_followers():
    result = FuseVertical().run(_chain(), PassContext(kernels={"matmul": "tvm"}))
    assert result.changed
    # the anchor takes add and relu; the reduction starts a group and takes exp
    assert_graph(
        result.graph,
        f"""
        tenant t(x=%t.x)
        %t.x = input() {{tenant=t}} : f32[2,4]
        %t.mm = matmul(%t.x, @{WKEY[:8]}) {{out_dtype=float32}} {{tenant=t, group=g0}} : f32[2,3]
        %t.add = add(%t.mm, @{B3KEY[:8]}) {{tenant=t, group=g0}} : f32[2,3]
        %t.relu = nn.relu(%t.add) {{tenant=t, group=g0}} : f32[2,3]
        %t.sum = sum(%t.relu) {{axis=[1]}} {{tenant=t, group=g1}} : f32[2]
        %t.exp = exp(%t.sum) {{tenant=t, group=g1}} : f32[2]
        return t: (%t.exp)
    """,
    )
    assert result.info["kernels"] == 2 and result.info["library_calls"] == 0


def test_library_call_is_its_own_kernel():
    ctx = PassContext(kernels={"matmul": "native"})
    offloaded = OffloadLibrary().run(_chain(), ctx).graph
    # mm + its bias, and the ReLU as the call's epilogue: the weight packed for it
    assert offloaded.node("t.relu").attrs.label == "native matmul[packed] +bias +relu"
    (packed,) = offloaded.node("t.relu").args[1:2]
    result = FuseVertical().run(offloaded, ctx)
    assert_graph(
        result.graph,
        f"""
        tenant t(x=%t.x)
        %t.x = input() {{tenant=t}} : f32[2,4]
        %t.relu = library_call(%t.x, @{packed.key[:8]}, @{B3KEY[:8]}) {{kernel=matmul, provider=native, variant=packed, bias=true, epilogue=relu}} {{tenant=t}} : f32[2,3]
        %t.sum = sum(%t.relu) {{axis=[1]}} {{tenant=t, group=g0}} : f32[2]
        %t.exp = exp(%t.sum) {{tenant=t, group=g0}} : f32[2]
        return t: (%t.exp)
    """,
    )
    assert groups(result.graph) == [["sum", "exp"]]  # reduction + elementwise
    assert result.graph.node("t.relu").group is None  # the library call
    assert result.info["kernels"] == 2 and result.info["library_calls"] == 1
    # without epilogues the ReLU heads the group after the call
    offloaded = OffloadLibrary(epilogues=False).run(_chain(), ctx).graph
    assert offloaded.node("t.add").attrs.symbol == "mtcompile.native.dense_packed_bias"
    result = FuseVertical().run(offloaded, ctx)
    assert groups(result.graph) == [["relu", "sum", "exp"]]
    assert result.graph.node("t.add").group is None


def test_negative_the_providers_alone_make_no_library_call():
    # fuse-vertical reads the decision from the graph: without offload-library, a matmul
    # whose provider is library is a TVM anchor like any other
    result = FuseVertical().run(_chain(), PassContext(kernels={"matmul": "native"}))
    assert groups(result.graph) == [["mm", "add", "relu"], ["sum", "exp"]]
    assert result.info["library_calls"] == 0


def test_negative_a_value_used_twice_ends_its_group():
    result = FuseVertical().run(_chain(extra_user=True), PassContext(kernels={"matmul": "tvm"}))
    assert groups(result.graph) == [["mm", "add", "relu"], ["sum", "exp"]]
    # relu is read by sum and returned: sum may not join relu's group (two users)
    g = result.graph
    assert g.node("t.relu").group != g.node("t.sum").group


def test_negative_constant_only_values_are_left_for_constant_folding():
    g = _chain()
    w_t = Node("t.wt", "relax.permute_dims", (ConstRef(WKEY),), F23, ("t",), attrs("axes=[1,0]"))
    g2 = Graph((g.nodes[0], w_t, *g.nodes[1:]), g.tenants, g.constants)
    result = FuseVertical().run(g2, PassContext(kernels={"matmul": "tvm"}))
    assert result.graph.node("t.wt").group is None


def test_opaque_op_is_a_group_of_its_own():
    """cumsum (TVM's extern scan kernel) takes no followers: astype and multiply after it
    start a group of their own (TVM's FuseOps fuses nothing with an opaque op)."""
    i24 = TensorTy((2, 4), "int64")
    nodes = [
        Node("t.x", INPUT, (), F24, ("t",)),
        Node("t.gt", "relax.greater", (Ref("t.x"), Ref("t.x")), TensorTy((2, 4), "bool"), ("t",)),
        Node("t.cs", "relax.cumsum", (Ref("t.gt"),), i24, ("t",), attrs("axis=1")),
        Node("t.f", "relax.astype", (Ref("t.cs"),), F24, ("t",), attrs("dtype=float32")),
        Node("t.mul", "relax.multiply", (Ref("t.x"), Ref("t.f")), F24, ("t",)),
    ]
    g = Graph(tuple(nodes), {"t": TenantIO((("x", "t.x"),), (Ref("t.mul"),))}, {})
    g.verify()
    result = FuseVertical().run(g, PassContext())
    assert groups(result.graph) == [["gt"], ["cs"], ["f", "mul"]]


class PositionIds(torch.nn.Module):
    """RoBERTa's and MPNet's position ids (a cumsum followed by elementwise ops), and a
    sort whose values go on through elementwise ops."""

    def forward(self, ids, x):
        mask = ids.ne(1).int()
        pos = (torch.cumsum(mask, dim=1).type_as(mask) + 0) * mask
        ranked = torch.sort(x, dim=-1).values * 2.0 + 1.0
        return pos.long() + 1, x * pos, ranked


@pytest.mark.slow  # compiles bundles of its own
def test_numerics_cumsum_and_sort_followed_by_elementwise_ops():
    """Regression: a group of cumsum + its elementwise followers failed in TVM's FuseTIR
    ("Inconsistent buffers out_buf and lv mapped to the same relax var")."""
    ids = torch.tensor([[0, 5, 1, 7, 1, 1, 3, 2], [1, 1, 4, 4, 9, 1, 2, 6]])
    x = seeded_input(3, 2, 8)
    bundle = mtcompile.compile([Tenant("pos", PositionIds(), example_inputs=(ids, x))])
    got = bundle.run("pos", ids, x)
    for g, w in zip(got, torch_outputs(PositionIds(), (ids, x)), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()


class Block(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc = torch.nn.Linear(16, 16)
            self.norm = torch.nn.LayerNorm(16)
        self.eval()

    def forward(self, x):
        y = torch.nn.functional.gelu(self.fc(x)) * 0.5 + x
        return torch.softmax(self.norm(y), dim=-1)


@pytest.mark.parametrize("kernels", ["native", "tvm"])
@pytest.mark.slow  # compiles bundles of its own
def test_numerics_and_one_kernel_per_group(kernels):
    x = seeded_input(5, 4, 16)
    tenants = [
        Tenant("a", Block(0), example_inputs=(x,)),
        Tenant(
            "b",
            torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh()).eval(),
            example_inputs=(x,),
        ),
    ]
    bundle = mtcompile.compile(tenants, kernels=kernels)
    assert bundle.verify()["ok"]
    for t in tenants:
        np.testing.assert_allclose(
            bundle.run(t.name, x)[0], torch_outputs(t.model, (x,))[0], atol=1e-5
        )
    # fuse-vertical ran on every function: its facts by function
    info = {p["name"]: p for p in bundle.compile_report["passes"]}["fuse-vertical"]["run_all"]
    (calls,) = bundle.trace("run_all", [np.asarray(x), np.asarray(x)])
    launched = [s for s, _ in calls if not s.startswith("vm.builtin")]
    assert len(launched) == info["kernels"]  # the groups are the kernels that run
    plain = mtcompile.compile(tenants, kernels=kernels, passes=WITHOUT)
    (calls,) = plain.trace("run_all", [np.asarray(x), np.asarray(x)])
    assert len(launched) <= sum(1 for s, _ in calls if not s.startswith("vm.builtin"))


@pytest.mark.slow
# same-arch (36 s: two builds of four encoders) is left out for the suite's time; its
# stacked form is covered by tests/test_fuse_horizontal.py
@pytest.mark.parametrize("name", ["heterogeneous", "shared-backbone"])
def test_demo_sets_no_more_kernels_than_tvm_fuseops(name):
    from mtcompile.models import get_set

    tenants = get_set(name)
    ours, tvms = mtcompile.compile(tenants), mtcompile.compile(tenants, passes=WITHOUT)

    def launched(b):
        args = [np.asarray(x) for t in tenants for x in t.example_inputs]
        if len(b.manifest.run_all_inputs) == 1:
            args = args[:1]
        return sum(1 for s, _ in b.trace("run_all", args)[0] if not s.startswith("vm.builtin"))

    info = {p["name"]: p for p in ours.compile_report["passes"]}["fuse-vertical"]["run_all"]
    assert launched(ours) == info["kernels"] <= launched(tvms)
    assert ours.verify()["ok"]
