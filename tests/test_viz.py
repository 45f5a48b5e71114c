"""mtcompile.tools.viz and the HTML report: pictures as SVG (counted by the ids given to their
shapes), rich display, the graph view in the manifest and the `report` command."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from mtcompile.cli import main
from mtcompile.errors import MTCompileError
from mtcompile.ir.graph import INPUT, ConstRef, Graph, Node, Ref, TenantIO, TensorTy, const_key
from mtcompile.runtime.manifest import (
    GraphStats,
    IOSpec,
    Manifest,
    MemoryInfo,
    PassSpec,
    StreamsInfo,
    TenantSig,
)
from mtcompile.tools import viz
from mtcompile.tools.html_report import graph_timeline, render

F = TensorTy((1, 8), "float32")


def ids(svg: str, kind: str) -> list[str]:
    """The SVG ids of the shapes of one kind (``node``, ``group``, ``tensor``, ``lane``...)."""
    return re.findall(rf'id="{kind}-([^"]*)"', svg)


def chain_graph(tenants: list[str], length: int, shared: int = 0, hfused: int = 0) -> Graph:
    """Tenants with a chain of `length` ops each on their own input; then `shared` nodes
    serving every tenant, and `hfused` nodes named as fuse-horizontal names its nodes.
    Consecutive pairs of a chain form fusion groups."""
    w = np.ones((8, 8), np.float32)
    key = const_key(w)
    nodes, ios = [], {}
    for t in tenants:
        prev = f"{t}.x"
        nodes.append(Node(prev, INPUT, (), F, (t,)))
        for i in range(length):
            op = "relax.matmul" if i % 2 == 0 else "relax.nn.relu"
            args = (Ref(prev), ConstRef(key)) if i % 2 == 0 else (Ref(prev),)
            nodes.append(Node(f"{t}.n{i}", op, args, F, (t,), group=f"{t}.g{i // 2}"))
            prev = f"{t}.n{i}"
        ios[t] = TenantIO((("x", f"{t}.x"),), (Ref(prev),))
    if shared or hfused:  # a chain on an input every tenant shares
        every, last = tuple(tenants), Ref("shared.s")
        nodes.append(Node("shared.s", INPUT, (), F, every))
        names = [f"s{i}" for i in range(shared)] + [f"hfuse0.{i}" for i in range(hfused)]
        for name in names:
            nodes.append(Node(name, "relax.nn.relu", (last,), F, every))
            last = Ref(name)
        ios = {
            t: TenantIO((*io.inputs, ("s", "shared.s")), (*io.outputs, last))
            for t, io in ios.items()
        }
    g = Graph(tuple(nodes), ios, {key: w})
    g.verify()
    return g


def timeline(n_tensors: int = 5) -> dict:
    tensors = [
        {
            "tensor": f"t{i}",
            "tenant": "ab"[i % 2],
            "offset": 64 * (i % 3),
            "size": 64,
            "first": i,
            "last": i + 1,
        }
        for i in range(n_tensors)
    ]
    return {
        "function": "run_all",
        "kernels": [f"k{i}" for i in range(n_tensors + 1)],
        "arena_bytes": 192,
        "lower_bound_bytes": 128,
        "tensors": tensors,
    }


def lanes() -> dict:
    rows = [
        {
            "kernel": f"k{i}",
            "stream": i % 2,
            "tenant": "ab"[i % 2],
            "start_us": 10.0 * (i // 2),
            "end_us": 10.0 * (i // 2) + 8,
        }
        for i in range(6)
    ]
    return {"num_streams": 2, "lanes": rows, "syncs": [["k0", "k3"], ["k1", "k4"]]}


# --------------------------------------------------------------------------- graph drawings


def test_small_graph_is_drawn_node_by_node_with_tenant_legend(graph):
    svg = viz.draw_graph(graph).svg
    assert sorted(ids(svg, "node")) == sorted(n.name for n in graph.nodes)
    assert sorted(ids(svg, "legend")) == ["a", "b"]
    assert ">a<" in svg and ">b<" in svg  # tenant names are text in the legend
    colors = viz.tenant_colors(["a", "b"])
    assert colors["a"] != colors["b"] and colors["a"].lower() in svg.lower()


def test_fusion_groups_are_boxed_and_shared_and_fused_nodes_marked():
    g = chain_graph(["a", "b"], 4, shared=2, hfused=3)
    svg = viz.draw_graph(g).svg
    assert sorted(ids(svg, "group")) == ["a.g0", "a.g1", "b.g0", "b.g1"]
    assert "shared by several tenants (3)" in svg  # 2 relus + the input
    assert "horizontally fused (3)" in svg
    assert viz.node_kind("hfuse0.1", ("a", "b")) == "hfused"
    assert viz.node_kind("s0", ("a", "b")) == "shared"
    assert viz.node_kind("a.n0", ("a",)) == "own"


@pytest.mark.slow  # draws graphs of hundreds of nodes
def test_large_graph_is_summarized_and_one_tenant_or_region_drawn():
    g = chain_graph(["t0", "t1", "t2", "t3"], 75)  # 4 tenants, 304 nodes
    summary = viz.draw_graph(g).svg
    assert ids(summary, "node") == []  # no node-by-node hairball
    assert "graph-summary" in summary and "304 nodes, 4 tenants" in summary
    assert sorted(set(ids(summary, "strip"))) == [f"t{i}-own" for i in range(4)]
    one = viz.draw_graph(g, tenant="t2").svg
    assert sorted(ids(one, "node")) == sorted(n.name for n in g.tenant_nodes("t2"))
    region = viz.draw_graph(g, region=(10, 40)).svg
    assert sorted(ids(region, "node")) == sorted(n.name for n in g.nodes[10:40])
    assert viz.draw_graph(g, max_nodes=400).svg.count('id="node-') == 304


def test_unknown_tenant_and_bad_region_are_clear_errors(graph):
    with pytest.raises(MTCompileError, match=r"unknown tenant 'zz'.*\['a', 'b'\]"):
        viz.draw_graph(graph, tenant="zz")
    with pytest.raises(MTCompileError, match="region"):
        viz.draw_graph(graph, region=(5, 2))
    with pytest.raises(MTCompileError, match="graph view"):
        viz.draw_graph({"nodes": []})


def test_graph_displays_itself_as_svg_in_ipython(graph):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    assert viz.install_display()
    svg = shell.display_formatter.formatters["image/svg+xml"](graph)
    assert svg.startswith("<svg") and len(ids(svg, "node")) == len(graph.nodes)


def test_graph_view_is_compact_json_and_draws_like_the_graph():
    g = chain_graph(["t0", "t1", "t2", "t3"], 75)
    view = json.loads(json.dumps(viz.graph_view(g)))
    assert view["tenants"] == ["t0", "t1", "t2", "t3"]
    assert len(view["nodes"]) == 304 and view["nodes"][1]["group"] == "t0.g0"
    assert view["nodes"][1]["inputs"] == ["t0.x"] and view["nodes"][1]["type"] == "f32[1,8]"
    assert len(json.dumps(view)) < 60_000
    assert ids(viz.draw_graph(view, tenant="t1").svg, "node") == ids(
        viz.draw_graph(g, tenant="t1").svg, "node"
    )


# --------------------------------------------------------------------------- schedules


def test_memory_timeline_has_one_rectangle_per_tensor_and_marks_bounds():
    svg = viz.draw_memory(timeline(5)).svg
    assert sorted(ids(svg, "tensor")) == [f"t{i}" for i in range(5)]
    assert 'id="arena-line"' in svg and 'id="lower-bound-line"' in svg
    assert "arena 0.2 KiB" in svg and "lower bound 0.1 KiB" in svg
    assert sorted(ids(svg, "legend")) == ["a", "b"]
    # a tensor of several tenants is grey, as shared nodes are; tenants keep their colours
    colors = viz.tenant_colors(["a", "a+b", "b"])
    assert colors["a+b"] == viz.SHARED_DARK and colors["b"] == viz.tenant_colors(["a", "b"])["b"]


def test_stream_lanes_have_one_bar_per_kernel():
    svg = viz.draw_streams(lanes()).svg
    assert sorted(ids(svg, "lane")) == [f"k{i}" for i in range(6)]
    assert "6 kernels on 2 stream(s), 2 sync(s)" in svg
    with pytest.raises(MTCompileError, match="draw_streams needs a dict with keys"):
        viz.draw_streams({"lanes": []})


def test_pass_summary_shows_nodes_kernels_and_bytes():
    rows = [
        {
            "name": "dedup",
            "changed": True,
            "nodes_after": 60,
            "kernels_after": 28,
            "weight_bytes_after": 3 << 20,
        },
        {
            "name": "fuse-vertical",
            "changed": True,
            "nodes_after": 57,
            "kernels_after": 24,
            "weight_bytes_after": 3 << 20,
        },
    ]
    svg = viz.draw_passes(rows).svg
    for text in ("nodes after each pass", "kernels after each pass", ">28<", ">24<", ">3<"):
        assert text in svg
    with pytest.raises(MTCompileError):
        viz.draw_passes([])


def test_timing_records_weight_bytes_per_pass_and_kernels_after_the_last(graph):
    from mtcompile.backend.emitted import kernel_dag
    from mtcompile.pass_infra import PassContext, run_passes
    from mtcompile.passes import build_pipeline

    ctx = PassContext(kernels={"matmul": "tvm"}, kernel_model=kernel_dag)
    _, records = run_passes(graph, build_pipeline(["dedup", "fuse-vertical"]), ctx)
    rows = [viz.pass_row(r) for r in records]
    # kernels are counted after the last pass (the model emits through TVM's fusion): a's
    # matmul and relu are one kernel; b's tuple and item are no kernels
    assert [r["kernels_after"] for r in rows] == [None, 1]
    _, without_model = run_passes(graph, build_pipeline(["dedup"]), PassContext())
    assert [r.kernels_after for r in without_model] == [None]  # no model: none counted
    assert all(r["weight_bytes_after"] == graph.weight_bytes() for r in rows)


# --------------------------------------------------------------------------- HTML report


def manifest_with(view: dict, memory=None, streams=None) -> Manifest:
    """A manifest that has only what a test gives it (a memory timeline, stream lanes)."""
    mem = None
    if memory:
        mem = MemoryInfo(
            **dict.fromkeys(
                (
                    "arena_bytes",
                    "lower_bound_bytes",
                    "naive_bytes",
                    "tvm_plan_bytes",
                    "unplanned_bytes",
                    "separate_plans_bytes",
                    "separate_arena_bytes",
                    "weight_bytes",
                    "weight_bytes_before_dedup",
                ),
                0,
            ),
            planned=True,
            functions={},
            timeline=memory,
        )
    return Manifest(
        name="demo",
        library="demo.so",
        target="llvm",
        versions={},
        tuning_db=None,
        pipeline=(PassSpec("dedup", {}),),
        kernels={},
        tenant_order=("a",),
        run_all_inputs=((("a", "x"),),),
        tenants={"a": TenantSig("torch", "0" * 64, (IOSpec("x", (1, 8), "float32"),), ())},
        graph=GraphStats(3, {"a": 3}, {}, 0, 0, 0),
        graph_view=view,
        streams=StreamsInfo(**streams) if streams else StreamsInfo(),
        memory=mem,
    )


def test_report_says_what_a_manifest_lacks_and_draws_what_it_has(graph):
    view = viz.graph_view(graph)
    bare = render(manifest_with(view))
    assert bare.startswith("<!DOCTYPE html>")
    for external in ("<script", "<link", "src=", 'href="http', "url(http"):
        assert external not in bare  # self-contained: opens offline
    assert bare.count("not available in this bundle") == 3  # passes, streams, memory
    full = render(
        manifest_with(
            dict(view, passes=[{"name": "dedup", "changed": False, "nodes_after": 6}]),
            timeline(4),
            lanes(),
        )
    )
    assert "not available" not in full
    summary_only = render(manifest_with(view, streams={"num_streams": 1, "num_syncs": 0}))
    assert "stream lanes: not available" in summary_only
    assert len(ids(full, "tensor")) == 4 and len(ids(full, "lane")) == 6
    assert len(ids(full, "node")) == len(graph.nodes)


def test_report_command_rejects_a_directory_that_is_not_a_bundle(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a bundle" in err
    (tmp_path / "manifest.json").write_text('{"format": "other/9"}')
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 1
    assert "format 'other/9'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_report_command_writes_the_report_of_a_saved_bundle(tiny_saved, tmp_path):
    out = tmp_path / "sub" / "report.html"
    assert main(["report", str(tiny_saved), "-o", str(out)]) == 0
    html = out.read_text()
    manifest = json.loads((tiny_saved / "manifest.json").read_text())
    view = manifest["graph_view"]
    assert view["tenants"] == ["lin", "conv", "multi"]
    assert [p["name"] for p in view["passes"]] == [p["name"] for p in manifest["pipeline"]]
    kernels = [p["kernels_after"] for p in view["passes"]]
    assert kernels[-1] > 0 and kernels[:-1] == [None] * (len(kernels) - 1)  # the last only
    assert len(ids(html, "node")) == len(view["nodes"])  # small: drawn whole
    for t in ("lin", "conv", "multi"):
        assert f"<td>{t}</td>" in html


def test_bundle_displays_itself_as_html(tiny_bundle):
    html = tiny_bundle._repr_html_()
    assert "mtcompile bundle" in html and "<svg" in html
    assert len(ids(html, "node")) == len(tiny_bundle.graph.nodes)


def test_a_compiled_bundle_carries_its_analyses_for_the_memory_timeline(tiny_bundle):
    from mtcompile.analysis.memory import MemoryPlan

    am = tiny_bundle.analyses
    assert am.holds("run_all", tiny_bundle.graph)
    timeline = graph_timeline(am)
    assert timeline == am.get("run_all", MemoryPlan).functions["run_all"].timeline()
    # the manifest's timeline is that plan's (a report without one draws this one)
    assert timeline["kernels"] == tiny_bundle.report()["memory"]["timeline"]["kernels"]
    assert graph_timeline(None) is None and graph_timeline(am, "no-such-function") is None


def test_drawing_a_pass_changed_graph_keeps_groups(graph):
    grouped = replace(
        graph,
        nodes=tuple(
            replace(n, group="g1") if n.name in ("a.mm", "a.r") else n for n in graph.nodes
        ),
    )
    assert ids(viz.draw_graph(grouped).svg, "group") == ["g1"]


def _offloaded_graph() -> Graph:
    """A Linear + ReLU on native kernels: one library call (packed weight, bias, ReLU)."""
    from mtcompile.ir.ops import LIBRARY_CALL, LibraryCall

    w, b = np.ones((8, 8), np.float32), np.ones(8, np.float32)
    x = Node("a.x", INPUT, (), F, ("a",))
    call = Node(
        "a.r",
        LIBRARY_CALL,
        (Ref("a.x"), ConstRef(const_key(w)), ConstRef(const_key(b))),
        F,
        ("a",),
        LibraryCall("native", "matmul", "packed", bias=True, epilogue="relu"),
    )
    g = Graph(
        (x, call),
        {"a": TenantIO((("x", "a.x"),), (Ref("a.r"),))},
        {const_key(w): w, const_key(b): b},
    )
    g.verify()
    return g


def test_library_calls_are_named_by_kernel_and_epilogue_in_views_pictures_and_report():
    view = viz.graph_view(_offloaded_graph())
    row = view["nodes"][1]
    assert row["op"] == "matmul[packed]+bias+relu"
    assert row["call"] == {
        "provider": "native",
        "kernel": "matmul",
        "variant": "packed",
        "bias": True,
        "epilogue": "relu",
        "symbol": "mtcompile.native.dense_packed_bias_relu",
    }
    svg = viz.draw_graph(view).svg
    assert "matmul[packed]" in svg and "+bias+relu" in svg and "mtcompile.nat" not in svg
    html = render(manifest_with(view))
    assert "<h2>Library calls</h2>" in html
    assert "<td>native matmul[packed]+bias+relu</td><td class='num'>1</td><td>a</td>" in html


def test_report_shows_the_numerics_check_and_the_per_kernel_profile_by_tenant():
    from mtcompile.tools.html_report import kernel_name

    checks = {
        "ok": True,
        "tenants": {
            "a": {"run_all_ok": True, "outputs": [{"ok": True, "max_abs": 1e-6, "max_rel": 2e-7}]}
        },
    }
    prof = {
        "repeat": 3,
        "tenants": {
            "a": {
                "total_us": 12.0,
                "kernels": [
                    {
                        "name": "mtcompile.native.conv2d_bias_add_relu",
                        "calls": 2,
                        "total_us": 10.0,
                        "mean_us": 5.0,
                        "share": 10 / 12,
                    },
                    {
                        "name": "vm.builtin.alloc_tensor",
                        "calls": 1,
                        "total_us": 2.0,
                        "mean_us": 2.0,
                        "share": 2 / 12,
                    },
                ],
            }
        },
    }
    html = render(manifest_with(viz.graph_view(_offloaded_graph())), checks=checks, profile=prof)
    assert "<h2>Numerics: PASS</h2>" in html and "<td>1.00e-06</td>" in html
    assert "<h2>Profile (median of 3 runs)</h2>" in html
    assert "<td>native conv2d+bias+add_relu</td><td class='num'>2</td>" in html
    assert kernel_name("vm.builtin.alloc_tensor") == "vm.builtin.alloc_tensor"
    assert kernel_name("mtcompile.torch.matmul") == "torch matmul"


def test_report_command_adds_the_profile_of_a_saved_bundle(tiny_saved, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(tiny_saved), "-o", str(out), "--profile", "2"]) == 0
    html = out.read_text()
    assert "<h2>Profile (median of 2 runs)</h2>" in html
    assert "<td>native conv2d+bias+relu</td>" in html  # by kernel and epilogue
    assert "<h2>Library calls</h2>" in html and "mtcompile.nat…" not in html
