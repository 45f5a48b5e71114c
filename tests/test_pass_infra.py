"""Pass infrastructure: registry, pipeline, runner, instruments, errors; eliminate-dead-nodes."""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
import pytest
from conftest import F23, F24, WKEY, small_graph, tiny_conv, torch_outputs

import mtcompile
from mtcompile import Tenant
from mtcompile.backend.emitted import kernel_dag
from mtcompile.errors import MTCompileError, VerifyError
from mtcompile.ir.graph import INPUT, ConstRef, Graph, Node, Ref, TenantIO, TensorTy, const_key
from mtcompile.pass_infra import (
    REGISTRY,
    DumpToDir,
    Pass,
    PassContext,
    PassError,
    PassResult,
    PrintAfter,
    Timing,
    VerifyAfter,
    make_pass,
    register,
    run_passes,
)
from mtcompile.passes import DEFAULT_PIPELINE, build_pipeline
from mtcompile.passes.eliminate_dead_nodes import EliminateDeadNodes

# --------------------------------------------------------------------------- test-only passes


@dataclass(frozen=True)
class DropMatmul(Pass):
    """Deliberately broken: removes a node that another node still reads."""

    name = "test-drop-matmul"

    def run(self, graph, ctx):
        return PassResult(
            Graph(
                tuple(n for n in graph.nodes if n.op != "relax.matmul"),
                graph.tenants,
                graph.constants,
            ),
            True,
        )


@dataclass(frozen=True)
class Explode(Pass):
    """Raises."""

    name = "test-explode"

    def run(self, graph, ctx):
        raise RuntimeError("boom")


@dataclass(frozen=True)
class WithOptions(Pass):
    """Does nothing; has options."""

    name = "test-with-options"
    threshold: int = 3
    mode: str = "fast"

    def run(self, graph, ctx):
        return PassResult(graph, False, {"threshold": self.threshold, "target": ctx.target})


@pytest.fixture
def temp_passes():
    """Registers test-only passes for one test and removes them from REGISTRY afterwards."""
    added = []
    for cls in (DropMatmul, Explode, WithOptions):
        register(cls)
        added.append(cls.name)
    yield
    for name in added:
        REGISTRY.pop(name, None)


# --------------------------------------------------------------------------- registry


def test_registry_and_default_pipeline():
    assert REGISTRY["eliminate-dead-nodes"] is EliminateDeadNodes
    assert set(DEFAULT_PIPELINE) <= set(REGISTRY)
    assert all(n == n.lower() and " " not in n and "_" not in n for n in REGISTRY)  # kebab-case
    assert [p.name for p in build_pipeline()] == DEFAULT_PIPELINE
    assert build_pipeline([]) == []


def test_unknown_pass_name_lists_registered_passes():
    with pytest.raises(MTCompileError) as info:
        make_pass("fuse-everything")
    msg = str(info.value)
    assert msg.startswith("unknown pass 'fuse-everything'; registered passes: ")
    assert all(repr(n) in msg for n in REGISTRY)
    with pytest.raises(MTCompileError, match="unknown pass 'nope'"):
        build_pipeline(["eliminate-dead-nodes", "nope"])


def test_unknown_option_lists_options(temp_passes):
    with pytest.raises(
        MTCompileError,
        match=r"pass 'eliminate-dead-nodes' has no option\(s\) "
        r"\['depth'\]; its options: none",
    ):
        make_pass("eliminate-dead-nodes", {"depth": 2})
    with pytest.raises(
        MTCompileError,
        match=r"pass 'test-with-options' has no option\(s\) "
        r"\['a', 'b'\]; its options: \['mode', 'threshold'\]",
    ):
        make_pass("test-with-options", {"b": 1, "a": 2, "threshold": 1})
    p = make_pass("test-with-options", {"threshold": 7})
    assert p == WithOptions(threshold=7) and p.options() == {"threshold": 7, "mode": "fast"}
    with pytest.raises(
        MTCompileError,
        match=r"options given for passes not in the pipeline: "
        r"\['test-with-options'\]",
    ):
        build_pipeline(["eliminate-dead-nodes"], {"test-with-options": {"threshold": 1}})


def test_register_needs_a_unique_name():
    @dataclass(frozen=True)
    class Nameless(Pass):
        pass

    @dataclass(frozen=True)
    class Copycat(Pass):
        name = "eliminate-dead-nodes"

    for cls in (Nameless, Copycat):
        with pytest.raises(ValueError, match="needs a unique name"):
            register(cls)
    assert REGISTRY["eliminate-dead-nodes"] is EliminateDeadNodes


def test_compile_checks_the_pipeline_before_any_work():
    # The model is not even a model: the bad pass name must be reported first.
    t = Tenant("a", model=object())
    with pytest.raises(MTCompileError, match="unknown pass 'nope'"):
        mtcompile.compile([t], passes=["nope"])
    with pytest.raises(MTCompileError, match=r"has no option\(s\) \['x'\]"):
        mtcompile.compile([t], pass_options={"eliminate-dead-nodes": {"x": 1}})


# --------------------------------------------------------------------------- runner


def test_default_pipeline_runs(graph):
    ctx = PassContext(kernel_model=kernel_dag)  # plan-memory plans on TVM's kernels
    out, records = run_passes(graph, build_pipeline(), ctx, instruments=[VerifyAfter()])
    out.verify()
    assert [r.name for r in records] == DEFAULT_PIPELINE
    # nothing to remove, share or batch in this graph; fuse-vertical only names the groups
    assert [(n.name, n.op, n.args) for n in out.nodes] == [
        (n.name, n.op, n.args) for n in graph.nodes
    ]
    assert out.node("a.mm").group == out.node("a.r").group is not None


def test_context_reaches_passes(graph, temp_passes):
    _, records = run_passes(graph, [WithOptions(threshold=5)], PassContext(target="cuda"))
    assert records[0].info == {"threshold": 5, "target": "cuda"}
    assert records[0].changed is False and records[0].nodes_after == len(graph)


def test_pass_error_names_the_pass_and_the_ones_before(graph, temp_passes):
    with pytest.raises(PassError) as info:
        run_passes(graph, [EliminateDeadNodes(), WithOptions(), Explode(), EliminateDeadNodes()])
    e = info.value
    assert str(e) == (
        "pass 'test-explode' failed (passes run before it: eliminate-dead-nodes, "
        "test-with-options): RuntimeError: boom"
    )
    assert e.pass_name == "test-explode"
    assert e.before == ["eliminate-dead-nodes", "test-with-options"]
    assert isinstance(e.cause, RuntimeError) and isinstance(e, MTCompileError)
    with pytest.raises(
        PassError,
        match=r"pass 'test-explode' failed \(passes run before it: "
        r"none\)",
    ):
        run_passes(graph, [Explode()])


def test_pass_error_through_compile(temp_passes):
    m, x = tiny_conv(0)
    with pytest.raises(
        PassError,
        match=r"pass 'test-explode' failed \(passes run before it: "
        r"eliminate-dead-nodes\): RuntimeError: boom",
    ):
        mtcompile.compile(
            [Tenant("a", m, example_inputs=x)], passes=["eliminate-dead-nodes", "test-explode"]
        )


# --------------------------------------------------------------------------- instruments


def test_timing_records_every_pass():
    timing = Timing()
    g = _dead_graph()
    _, records = run_passes(g, [EliminateDeadNodes(), EliminateDeadNodes()], instruments=[timing])
    assert [(r.name, r.changed, r.nodes_after) for r in timing.records] == [
        ("eliminate-dead-nodes", True, 7),
        ("eliminate-dead-nodes", False, 7),
    ]
    assert timing.records[0].info == {"removed_nodes": 2}
    assert all(r.seconds >= 0 for r in timing.records)
    assert [r.name for r in records] == [r.name for r in timing.records]


def test_print_after(capsys):
    g = _dead_graph()
    buf = io.StringIO()
    out, _ = run_passes(
        g, [EliminateDeadNodes(), EliminateDeadNodes()], instruments=[PrintAfter(stream=buf)]
    )
    assert buf.getvalue() == (
        f"// after eliminate-dead-nodes (changed)\n{out}\n"
        f"// after eliminate-dead-nodes (unchanged)\n{out}\n"
    )
    run_passes(g, [EliminateDeadNodes()], instruments=[PrintAfter(["eliminate-dead-nodes"])])
    assert capsys.readouterr().out == f"// after eliminate-dead-nodes (changed)\n{out}\n"
    run_passes(g, [EliminateDeadNodes()], instruments=[PrintAfter(["some-other-pass"])])
    assert capsys.readouterr().out == ""


def test_dump_to_dir(tmp_path):
    g = _dead_graph()
    out, _ = run_passes(
        g, [EliminateDeadNodes(), EliminateDeadNodes()], instruments=[DumpToDir(tmp_path / "dump")]
    )
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == [
        "000_input.txt",
        "001_eliminate-dead-nodes.txt",
        "002_eliminate-dead-nodes.txt",
    ]
    assert (tmp_path / "dump" / "000_input.txt").read_text() == f"{g}\n"
    assert (tmp_path / "dump" / "001_eliminate-dead-nodes.txt").read_text() == f"{out}\n"


@pytest.mark.slow  # compiles bundles of its own
def test_dump_to_dir_through_compile(tmp_path):
    m, x = tiny_conv(0)
    bundle = mtcompile.compile(
        [Tenant("a", m, example_inputs=x)], instruments=[DumpToDir(tmp_path)]
    )
    expected = [f"{i + 1:03d}_{name}.txt" for i, name in enumerate(DEFAULT_PIPELINE)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_input.txt", *expected]
    # one dump per pass: the whole module (the tenant's entry and run_all)
    assert (tmp_path / expected[-1]).read_text() == f"{bundle.module}\n"
    assert "func a(a):" in (tmp_path / expected[-1]).read_text()
    assert "func run_all(a):" in (tmp_path / expected[-1]).read_text()
    assert "%a.gv = tuple" in (tmp_path / "000_input.txt").read_text()


def test_verify_after_catches_a_broken_pass(graph, temp_passes, monkeypatch):
    monkeypatch.delenv("MTCOMPILE_VERIFY", raising=False)  # CI sets it: verify always
    # Without the instrument the broken graph goes through unnoticed...
    out, _ = run_passes(graph, [DropMatmul()])
    assert "a.mm" not in out
    # ...with it, the runner stops and names the pass.
    with pytest.raises(PassError) as info:
        run_passes(graph, [EliminateDeadNodes(), DropMatmul()], instruments=[VerifyAfter()])
    e = info.value
    assert e.pass_name == "test-drop-matmul" and e.before == ["eliminate-dead-nodes"]
    assert isinstance(e.cause, VerifyError)
    assert "%a.r reads %a.mm, which is defined nowhere" in str(e)
    # Through compile too, before anything reaches TVM.
    m, x = tiny_conv(0)
    with pytest.raises(PassError, match="pass 'test-drop-matmul' failed.*VerifyError"):
        mtcompile.compile(
            [Tenant("a", m, example_inputs=x)],
            passes=["test-drop-matmul"],
            instruments=[VerifyAfter()],
        )


# --------------------------------------------------------------------------- eliminate-dead-nodes

D = np.full((2, 4), 2.0, np.float32)
DKEY = const_key(D)


def _dead_graph() -> Graph:
    """small_graph plus a dead chain in tenant a (reading a constant nothing else reads)
    and an unused input of tenant b."""
    g = small_graph()
    a_nodes = [
        *g.tenant_nodes("a"),
        Node("a.d1", "relax.add", (Ref("a.x"), ConstRef(DKEY)), F24, ("a",)),
        Node("a.d2", "relax.nn.relu", (Ref("a.d1"),), F24, ("a",)),
    ]
    b_nodes = [*g.tenant_nodes("b"), Node("b.unused", INPUT, (), TensorTy((3,), "int64"), ("b",))]
    tenants = dict(g.tenants, b=TenantIO((("y", "b.y"), ("u", "b.unused")), (Ref("b.g"),)))
    out = Graph(tuple(a_nodes + b_nodes), tenants, {**g.constants, DKEY: D})
    out.verify()
    return out


def test_eliminate_dead_nodes_structure():
    g = _dead_graph()
    result = EliminateDeadNodes().run(g, PassContext())
    assert result.changed and result.info == {"removed_nodes": 2}
    assert str(result.graph) == "\n".join(
        [
            "tenant a(x=%a.x)",
            "tenant b(y=%b.y, u=%b.unused)",
            "%a.x = input() {tenant=a} : f32[2,4]",
            f"%a.mm = matmul(%a.x, @{WKEY[:8]}) {{out_dtype=float32}} {{tenant=a}} : f32[2,3]",
            "%a.r = nn.relu(%a.mm) {tenant=a} : f32[2,3]",
            "%b.y = input() {tenant=b} : f32[2,3]",
            "%b.t = tuple(%b.y, %b.y) {tenant=b} : (f32[2,3], f32[2,3])",
            "%b.g = get_item(%b.t) {0} {tenant=b} : f32[2,3]",
            "%b.unused = input() {tenant=b} : i64[3]",  # inputs stay: they are the signature
            "return a: (%a.r)",
            "return b: (%b.g)",
        ]
    )
    assert set(result.graph.constants) == {WKEY}  # the dead chain's constant went with it
    assert set(g.constants) == {WKEY, DKEY}  # the input graph is untouched
    result.graph.verify()


def test_eliminate_dead_nodes_negative(graph):
    result = EliminateDeadNodes().run(graph, PassContext())
    assert result.changed is False and result.info == {}
    assert result.graph is graph  # nothing to remove: the very same graph


def test_eliminate_dead_nodes_keeps_nodes_shared_with_a_live_tenant():
    # %s.y serves two tenants; only u reads it, yet it must stay.
    x = Node("s.x", INPUT, (), F23, ("s", "u"))
    y = Node("s.y", "relax.nn.relu", (Ref("s.x"),), F23, ("s", "u"))
    z = Node("u.z", "relax.exp", (Ref("s.y"),), F23, ("u",))
    g = Graph(
        (x, y, z),
        {
            "s": TenantIO((("x", "s.x"),), (Ref("s.x"),)),
            "u": TenantIO((("x", "s.x"),), (Ref("u.z"),)),
        },
    )
    result = EliminateDeadNodes().run(g, PassContext())
    assert not result.changed and [n.name for n in result.graph.nodes] == ["s.x", "s.y", "u.z"]
    g2 = replace(g, tenants=dict(g.tenants, u=TenantIO((("x", "s.x"),), (Ref("s.x"),))))
    assert [n.name for n in EliminateDeadNodes().run(g2, PassContext()).graph.nodes] == ["s.x"]


@pytest.mark.slow  # compiles bundles of its own
def test_eliminate_dead_nodes_numerics():
    m, x = tiny_conv(0)
    bundle = mtcompile.compile([Tenant("a", m, example_inputs=x)], passes=["eliminate-dead-nodes"])
    (rec,) = bundle.compile_report["passes"]
    # one run over the module, facts by function: the tenant's entry holds its live nodes
    # from the start (`restrict`), run_all is the merged graph
    assert rec["name"] == "eliminate-dead-nodes" and rec["changed"]
    assert rec["run_all"] == {"removed_nodes": 1} and "a" not in rec
    assert "a.gv" not in bundle.graph  # the importer's dead output tuple
    (got,) = bundle.run("a", x[0])
    (want,) = torch_outputs(m, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert bundle.verify(atol=1e-5)["ok"]
    # Same numbers with no passes at all.
    unopt = mtcompile.compile([Tenant("a", m, example_inputs=x)], passes=[])
    assert unopt.manifest.pipeline == () and "a.gv" in unopt.graph
    np.testing.assert_array_equal(unopt.run("a", x[0])[0], got)


def test_temp_passes_are_gone_after_the_tests_that_used_them():
    # Runs last in this file: the fixture must have removed every test-only pass.
    assert not any(n.startswith("test-") for n in REGISTRY)


def test_mtcompile_verify_runs_the_verifier_after_every_pass(graph, temp_passes, monkeypatch):
    """MTCOMPILE_VERIFY=1 (CI sets it): a broken pass is caught with no instrument given."""
    monkeypatch.setenv("MTCOMPILE_VERIFY", "1")
    with pytest.raises(PassError) as info:
        run_passes(graph, [EliminateDeadNodes(), DropMatmul()])
    assert isinstance(info.value.cause, VerifyError)
    monkeypatch.setenv("MTCOMPILE_VERIFY", "0")
    out, _ = run_passes(graph, [DropMatmul()])
    assert "a.mm" not in out
