"""Explicit analyses: passes declare what they require, compute and preserve; the runner
drops the rest and refuses stale or missing ones; a memory plan records the stream
assignment it was made for; machine facts come through the pass context; run_all and
every function of the module (entries, run_all, subsets) go through one pipeline run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from conftest import linear_relu, tiny_tenants

import mtcompile
from mtcompile import Tenant, api
from mtcompile.analysis.memory import MemoryPlan
from mtcompile.analysis.streams import StreamAssignment
from mtcompile.backend.emitted import kernel_dag
from mtcompile.backend.kernels import resolve_providers
from mtcompile.backend.stream_layout import stream_layout
from mtcompile.errors import MTCompileError
from mtcompile.ir.module import Module
from mtcompile.pass_infra import (
    REGISTRY,
    AnalysisError,
    Instrument,
    Pass,
    PassContext,
    PassOptionError,
    PassResult,
    analysis_manager,
    check_pipeline,
    make_pass,
    register,
    run_passes,
)
from mtcompile.passes import build_pipeline
from mtcompile.passes.assign_streams import AssignStreams
from mtcompile.passes.plan_memory import PlanMemory

STALE = ["fuse-vertical", "plan-memory", "assign-streams"]
MAX = {"assign-streams": {"policy": "max"}}


# --------------------------------------------------------------------------- test-only passes


@dataclass(frozen=True)
class NeedsStreams(Pass):
    """Requires the stream assignment; reports how many streams it saw."""

    name = "test-needs-streams"
    scope = "run-all"  # only run_all has streams
    requires = (StreamAssignment,)

    def run(self, graph, ctx):
        a = ctx.analysis(graph, StreamAssignment)
        return PassResult(graph, False, {"streams": a.num_streams})


@dataclass(frozen=True)
class _Everywhere(NeedsStreams):
    scope = "function"


@dataclass(frozen=True)
class Rebuild(Pass):
    """Reports a changed graph and declares it keeps the stream assignment valid."""

    name = "test-rebuild-keeps-streams"
    preserves = (StreamAssignment,)

    def run(self, graph, ctx):
        return PassResult(graph.with_nodes(graph.nodes), True)


@dataclass(frozen=True)
class Notes:
    """An analysis type no pass declares."""

    n: int = 1


@dataclass(frozen=True)
class Scribble(Pass):
    """Returns an analysis it does not declare."""

    name = "test-scribble"

    def run(self, graph, ctx):
        return PassResult(graph, False, {}, (Notes(),))


@pytest.fixture
def temp_passes():
    for cls in (NeedsStreams, Rebuild, Scribble):
        register(cls)
    yield
    for cls in (NeedsStreams, Rebuild, Scribble):
        REGISTRY.pop(cls.name, None)


PROVIDERS = resolve_providers("llvm", None)


@pytest.fixture(scope="module")
def tiny():
    """The tiny tenants merged, no passes run: three independent tenants."""
    module, *_ = api._front(tiny_tenants(), "llvm", [], (), api._Stages(lambda _m: None), PROVIDERS)
    return module.functions["run_all"]


def _planned(graph, *passes):
    """The graph after the passes, and the manager holding its analyses."""
    am = analysis_manager()
    out, _ = run_passes(
        graph,
        [make_pass("eliminate-dead-nodes"), make_pass("fuse-vertical"), *passes],
        PassContext(kernels=PROVIDERS, cores=4, kernel_model=kernel_dag),
        analyses=am,
    )
    return out, am


def _chosen(am, function="run_all"):
    """The analyses of `function` in `am` that a pass computed (not derived ones)."""
    return {cls for cls in am.all_cached(function) if not am.derivable(cls)}


# --------------------------------------------------------------------------- declarations


def test_the_passes_declare_their_analyses():
    assert AssignStreams.computes == (StreamAssignment,)
    assert MemoryPlan not in AssignStreams.preserves  # a plan made for another order
    assert AssignStreams.scope == "run-all"  # the other functions run on one stream
    assert PlanMemory.computes == (MemoryPlan,) and StreamAssignment in PlanMemory.preserves
    for name in ("dedup", "fuse-horizontal", "eliminate-dead-nodes", "fuse-vertical"):
        cls = REGISTRY[name]
        assert cls.requires == cls.computes == () and cls.preserves is None, name


def test_a_pass_that_changes_the_graph_drops_what_it_does_not_preserve(tiny, temp_passes):
    out, am = _planned(tiny, AssignStreams(policy="max"), PlanMemory())
    assert _chosen(am) == {StreamAssignment, MemoryPlan}
    before = am.all_cached("run_all")
    # unchanged graph, default declaration: everything stays
    same, _ = run_passes(out, [make_pass("eliminate-dead-nodes")], analyses=am)
    assert am.all_cached("run_all") == before and am.holds("run_all", same)
    # changed graph: only what the pass declares it preserves, kept by the runner
    renamed, _ = run_passes(out, [Rebuild()], analyses=am)
    assert _chosen(am) == {StreamAssignment} and am.holds("run_all", renamed)
    assert am.cached("run_all", StreamAssignment) is before[StreamAssignment]


def test_a_pass_attaching_an_undeclared_analysis_is_refused(graph, temp_passes):
    with pytest.raises(
        AnalysisError,
        match=r"pass 'test-scribble' returned analysis "
        r"\['Notes'\] that it does not declare",
    ):
        run_passes(graph, [Scribble()])


def test_a_missing_requirement_names_the_pass_the_analysis_and_the_fix(graph, tiny, temp_passes):
    msg = (
        r"pass 'test-needs-streams' requires analysis 'StreamAssignment', which no pass before it "
        r"computed on the graph it gets; run 'assign-streams' before 'test-needs-streams'"
    )
    with pytest.raises(AnalysisError, match=msg):
        build_pipeline(["fuse-vertical", "test-needs-streams"])
    with pytest.raises(AnalysisError, match=msg):
        run_passes(graph, [NeedsStreams()])
    # a pass that changed the graph since invalidated it: the runner notices
    tvm = PassContext(kernels={"matmul": "tvm"}, kernel_model=kernel_dag)
    lost = "'fuse-vertical' invalidates analysis 'StreamAssignment'"
    with pytest.raises(AnalysisError, match=lost):
        run_passes(graph, [AssignStreams(), make_pass("fuse-vertical"), NeedsStreams()], tvm)
    am = analysis_manager()
    streamed, _ = run_passes(graph, [AssignStreams()], tvm, analyses=am)  # an earlier run
    assert am.cached("run_all", StreamAssignment) is not None
    with pytest.raises(AnalysisError, match=msg):
        run_passes(streamed, [make_pass("fuse-vertical"), NeedsStreams()], tvm, analyses=am)
    _, records = run_passes(
        tiny,
        build_pipeline(["assign-streams", "test-needs-streams"], MAX),
        PassContext(kernels=PROVIDERS, cores=4, kernel_model=kernel_dag),
    )
    assert records[-1].info == {"streams": 5}  # the very assignment assign-streams made
    # a pass requiring streams on every function (only run_all has them)
    with pytest.raises(
        AnalysisError, match="'test-needs-streams' requires analysis 'StreamAssignment'"
    ):
        check_pipeline([AssignStreams(), _Everywhere()])
    check_pipeline([AssignStreams(), NeedsStreams()])


# --------------------------------------------------------------------------- stale memory plans


def test_plan_memory_then_assign_streams_is_refused_before_any_work():
    msg = (
        r"pass 'assign-streams' invalidates analysis 'MemoryPlan' computed by 'plan-memory' "
        r"before it \(it does not preserve it\), and no later pass computes it again: run "
        r"'plan-memory' after 'assign-streams' \(pipeline: fuse-vertical, plan-memory, "
        r"assign-streams\)"
    )
    with pytest.raises(AnalysisError, match=msg):
        build_pipeline(STALE, MAX)
    with pytest.raises(AnalysisError, match="run 'plan-memory' after 'assign-streams'"):
        build_pipeline(["plan-memory", "assign-streams"])
    # through compile: the model is not even a model, so nothing ran before the check
    with pytest.raises(AnalysisError, match="run 'plan-memory' after 'assign-streams'"):
        mtcompile.compile([Tenant("a", model=object())], passes=STALE, pass_options=MAX)
    # computing it again after is fine
    assert [p.name for p in build_pipeline([*STALE, "plan-memory"], MAX)] == [*STALE, "plan-memory"]


def test_the_runner_refuses_a_plan_lost_to_a_pass_that_changed_the_graph(tiny):
    graph = tiny  # plan-memory plans on the kernels TVM emits: a graph TVM compiles
    kernels = {"matmul": "tvm"}
    with pytest.raises(
        AnalysisError,
        match=r"pass 'fuse-vertical' invalidates analysis "
        r"'MemoryPlan' computed by 'plan-memory' before it "
        r"\(it changed the graph\)",
    ):
        run_passes(
            graph,
            [PlanMemory(), make_pass("fuse-vertical")],
            PassContext(kernels=kernels, kernel_model=kernel_dag),
        )
    # the same passes one by one: each run starts afresh, the plan is simply dropped
    am = analysis_manager()
    planned, _ = run_passes(
        graph, [PlanMemory()], PassContext(kernels=kernels, kernel_model=kernel_dag), analyses=am
    )
    assert _chosen(am) == {MemoryPlan}
    fused, _ = run_passes(
        planned,
        [make_pass("fuse-vertical")],
        PassContext(kernels=kernels, kernel_model=kernel_dag),
        analyses=am,
    )
    assert fused is not planned and am.holds("run_all", fused) and _chosen(am) == set()


def test_a_memory_plan_records_the_assignment_it_was_made_for(tiny):
    _, plain = _planned(tiny, PlanMemory())
    assert plain.get("run_all", MemoryPlan).streams is None  # program order
    _, am = _planned(tiny, AssignStreams(policy="max"), PlanMemory())
    a = am.get("run_all", StreamAssignment)
    assert a.num_streams == 5 and am.get("run_all", MemoryPlan).streams == a.fingerprint()
    # the fingerprint is the streams and syncs, not the estimate
    other = StreamAssignment(a.streams, a.syncs, "auto", 9.0)
    assert other.fingerprint() == a.fingerprint()
    assert StreamAssignment(a.streams[::-1], a.syncs).fingerprint() != a.fingerprint()


def test_lowering_refuses_streams_over_a_plan_made_for_another_order(tiny):
    _, am = _planned(tiny, AssignStreams(policy="max"), PlanMemory())
    assert stream_layout(am) is not None
    # a sequential plan under a 5-stream assignment (what a stale pipeline used to build)
    am.put("run_all", _planned(tiny, PlanMemory())[1].get("run_all", MemoryPlan))
    with pytest.raises(
        MTCompileError,
        match=r"run_all's memory plan was made for program "
        r"order, not for the 5-stream assignment .* Run "
        r"plan-memory after assign-streams",
    ):
        stream_layout(am)


# --------------------------------------------------------------------------- machine facts


def test_assign_streams_reads_cores_from_the_context(tiny, monkeypatch):
    graph = tiny  # assign-streams works on the kernels TVM emits: a graph TVM compiles
    import os

    def no_machine():
        raise AssertionError("a pass asked the machine for its cores")

    monkeypatch.setattr(os, "cpu_count", no_machine)
    _, records = run_passes(
        graph, [AssignStreams()], PassContext(cores=12, kernel_model=kernel_dag)
    )
    assert records[0].info["cores"] == 12
    _, records = run_passes(
        graph, [AssignStreams(cores=3)], PassContext(cores=12, kernel_model=kernel_dag)
    )
    assert records[0].info["cores"] == 3
    assert PassContext().cores == 1  # a hand-made context is a one-core machine


@pytest.mark.slow  # imports and runs the whole pipeline
def test_compile_reads_the_cores_once(monkeypatch):
    calls = []
    real = api.usable_cores
    monkeypatch.setattr(api, "usable_cores", lambda: calls.append(1) or real())
    *_, am = api._front(
        tiny_tenants(),
        "llvm",
        build_pipeline(),
        (),
        api._Stages(lambda _m: None),
        resolve_providers("llvm", None),
    )
    assert len(calls) == 1
    assert am.get("run_all", StreamAssignment).info["cores"] == real()


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "name, options, match",
    [
        (
            "assign-streams",
            {"streams": 2.5},
            r"option 'streams' must be int \| None, got 2.5 "
            r"\(float\)",
        ),
        ("assign-streams", {"streams": 0}, "streams must be at least 1, got 0"),
        ("assign-streams", {"cores": True}, r"option 'cores' must be int \| None, got True"),
        ("assign-streams", {"policy": "fastest"}, "unknown policy 'fastest'"),
        (
            "assign-streams",
            "max",
            r"options of pass 'assign-streams' must be a dict of option "
            r"-> value, got 'max' \(str\)",
        ),
        ("plan-memory", {"alignment": 0}, "alignment must be a power of two, got 0"),
        ("plan-memory", {"strategy": 3}, r"option 'strategy' must be str, got 3 \(int\)"),
        ("fuse-horizontal", {"ops": "relax.matmul"}, r"option 'ops' must be tuple\[str, \.\.\.\]"),
    ],
)
def test_bad_option_values_fail_when_the_pass_is_made(name, options, match):
    with pytest.raises(PassOptionError, match=match) as info:
        make_pass(name, options)
    assert str(info.value).startswith(f"pass '{name}'") or "options of pass" in str(info.value)
    with pytest.raises(PassOptionError, match=match):
        build_pipeline(None, {name: options})
    with pytest.raises(PassOptionError, match=match):  # before any work
        mtcompile.compile([Tenant("a", model=object())], pass_options={name: options})


def test_good_options_pass_and_lists_become_tuples():
    p = make_pass("fuse-horizontal", {"ops": ["relax.matmul"], "min_group": 3})
    assert p.ops == ("relax.matmul",) and p.min_group == 3
    assert make_pass("assign-streams", {"min_speedup": 2}).min_speedup == 2
    with pytest.raises(MTCompileError, match=r"pass options must be a dict of pass name"):
        build_pipeline(None, [("assign-streams", {})])


# --------------------------------------------------------------------------- two runs


def _twins():
    (m1, x1), (m2, x2) = linear_relu(0), linear_relu(1)
    return [Tenant("p", m1, example_inputs=x1), Tenant("q", m2, example_inputs=x2)]


class _Seen(Instrument):
    """Records each pass an instrument sees, and the functions of the module it got."""

    def __init__(self):
        self.seen = []

    def after_pass(self, p, result, index, seconds):
        self.seen.append((p.name, tuple(result.graph.functions)))


def test_one_pipeline_run_over_a_module_of_functions():
    pipeline = build_pipeline(None, MAX)
    m3, x3 = linear_relu(2)
    tenants = [*_twins(), Tenant("r", m3, example_inputs=x3)]
    seen = _Seen()
    module, _, graphs, records, am = api._front(
        tenants,
        "llvm",
        pipeline,
        [seen],
        api._Stages(lambda _m: None),
        resolve_providers("llvm", None),
        subsets={"run_some__p__q": ("p", "q")},
    )
    # every pass once, over the whole module
    functions = ("p", "q", "r", "run_all", "run_some__p__q")
    assert seen.seen == [(p.name, functions) for p in pipeline]
    assert [r.name for r in records] == [p.name for p in pipeline]
    fns = module.functions
    # run_all and the subset: batched by fuse-horizontal (over their own tenants only)
    for f, tenants_in in (("run_all", {"p", "q", "r"}), ("run_some__p__q", {"p", "q"})):
        hfused = [n for n in fns[f].nodes if n.name.startswith("hfuse")]
        assert hfused and set(fns[f].tenants) == tenants_in, f
        assert {t for n in hfused for t in n.tenants} <= tenants_in, f
    # streams on run_all only; a memory plan per function, made for that function
    assert _chosen(am) == {StreamAssignment, MemoryPlan}
    for f, g in fns.items():
        assert am.holds(f, g), f
        if f != "run_all":
            assert _chosen(am, f) == {MemoryPlan}, f
            assert not any(n.name.startswith("hfuse") for n in g.nodes) or len(g.tenants) > 1
        assert set(am.get(f, MemoryPlan).functions) == {f}
    assert set(api._memory_plan(module, am).functions) == set(functions)
    # a tenant's entry is the pipeline run on that tenant's graph alone
    ctx = PassContext("llvm", resolve_providers("llvm", None), kernel_model=kernel_dag)
    alone, _ = run_passes(Module({"p": graphs[0]}), pipeline, ctx)
    assert str(alone.functions["p"]) == str(fns["p"])


@pytest.mark.slow
def test_streams_after_the_plan_equal_sequential_bit_for_bit():
    """The shortest pipeline that lowers streams, forced to its maximum: run_all on
    streams equals one stream bit for bit, call after call (a plan made for program order
    under streams once gave wrong answers on most calls)."""
    from mtcompile.tools.verify import seeded_run_all_inputs

    order = ["fuse-vertical", "assign-streams", "plan-memory"]
    seq = mtcompile.compile(
        tiny_tenants(), passes=order, pass_options={"assign-streams": {"streams": 1}}
    )
    par = mtcompile.compile(tiny_tenants(), passes=order, pass_options=MAX)
    assert seq.num_streams == 1 and par.num_streams > 1
    for r in range(60):
        inputs = seeded_run_all_inputs(seq, r % 4)
        want, got = seq.run_all(inputs), par.run_all(inputs)
        for t in want:
            for x, y in zip(want[t], got[t], strict=True):
                np.testing.assert_array_equal(x, y, err_msg=f"call {r}, tenant {t}")
    for t in seq.tenant_names:  # the entries too
        ins = seeded_run_all_inputs(seq, 0)[t]
        for a, b in zip(seq.run(t, *ins), par.run(t, *ins), strict=True):
            np.testing.assert_array_equal(a, b)
