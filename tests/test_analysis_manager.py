"""The analysis manager: analyses by (function, type), derived ones computed once per
function and graph by pluggable providers, dropped unless the pass that changed the graph
preserves them; chosen ones (user options) only ever computed by their pass."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
from conftest import tiny_tenants

from mtcompile import api
from mtcompile.analysis.manager import Derived
from mtcompile.analysis.memory import Liveness, MemoryPlan, lifetimes
from mtcompile.analysis.schedule import KernelDAG
from mtcompile.analysis.streams import StreamAssignment
from mtcompile.backend.emitted import kernel_dag
from mtcompile.backend.kernels import resolve_providers
from mtcompile.pass_infra import (
    AnalysisError,
    Pass,
    PassContext,
    PassResult,
    analysis_manager,
    make_pass,
    run_passes,
)
from mtcompile.passes.assign_streams import AssignStreams
from mtcompile.passes.plan_memory import PlanMemory

PROVIDERS = resolve_providers("llvm", None)
CTX = PassContext(kernels=PROVIDERS, cores=4, kernel_model=kernel_dag)


@dataclass(frozen=True)
class Rebuild(Pass):
    """Builds new nodes (a changed graph) and preserves nothing but the streams."""

    name = "test-rebuild"
    preserves = (StreamAssignment,)

    def run(self, graph, ctx):
        return PassResult(graph.with_nodes(graph.nodes), True)


@dataclass(frozen=True)
class RebuildKeepsKernels(Pass):
    """Builds new nodes (a changed graph) that it declares keep the kernel DAG valid."""

    name = "test-rebuild-keeps-kernels"
    preserves = (KernelDAG,)

    def run(self, graph, ctx):
        return PassResult(graph.with_nodes(graph.nodes), True)


class Counting:
    """A kernel-DAG provider (the kernels TVM emits) that records each graph it is called on."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append(graph)
        return copy.copy(kernel_dag(graph))  # a new value per call (the model caches by content)


@pytest.fixture(scope="module")
def tiny_module():
    """The tiny tenants merged into a module (entries and run_all), no passes run."""
    module, *_ = api._front(tiny_tenants(), "llvm", [], (), api._Stages(lambda _m: None), PROVIDERS)
    return module


def test_a_derived_analysis_is_computed_once_per_function_and_graph(tiny_module):
    count = Counting()
    am = analysis_manager(providers={KernelDAG: count})
    pipeline = [make_pass("eliminate-dead-nodes"), AssignStreams(policy="max"), PlanMemory()]
    module, records = run_passes(tiny_module, pipeline, CTX, analyses=am)
    # assign-streams, plan-memory, liveness and the timer after the last pass share one DAG
    assert len(count.graphs) == len(module.functions) == 4
    assert {id(g) for g in count.graphs} == {id(g) for g in module.functions.values()}
    dag = am.cached("run_all", KernelDAG)
    assert [r.kernels_after for r in records] == [None, None, len(dag.kernels)]
    assert am.get("run_all", Liveness) == Liveness.of(dag)  # derived from the cached DAG
    assert len(count.graphs) == 4


def test_a_derived_analysis_is_dropped_by_a_change_unless_preserved(tiny_module):
    count = Counting()
    am = analysis_manager(providers={KernelDAG: count})
    graph = tiny_module.functions["run_all"]
    out, _ = run_passes(graph, [AssignStreams(policy="max")], CTX, analyses=am)
    first = am.cached("run_all", KernelDAG)
    assert first is not None and len(count.graphs) == 1
    # a changed graph that does not preserve it: dropped, computed again on the new graph
    rebuilt, _ = run_passes(out, [Rebuild()], CTX, analyses=am)
    assert len(count.graphs) == 2 and count.graphs[-1] is rebuilt
    assert am.cached("run_all", KernelDAG) is not first
    assert am.cached("run_all", StreamAssignment) is not None  # what it preserves stays
    # a changed graph that preserves it: kept as it is, not computed again
    second = am.cached("run_all", KernelDAG)
    kept, records = run_passes(rebuilt, [RebuildKeepsKernels()], CTX, analyses=am)
    assert kept is not rebuilt and am.holds("run_all", kept)
    assert am.cached("run_all", KernelDAG) is second and len(count.graphs) == 2
    assert records[0].kernels_after == len(second.kernels)
    assert am.cached("run_all", StreamAssignment) is None  # it did not preserve that one


def test_a_graph_given_from_outside_loses_the_analyses_of_the_old_one(tiny_module):
    graph = tiny_module.functions["run_all"]
    am = analysis_manager({"run_all": graph}, {KernelDAG: kernel_dag})
    am.get("run_all", Liveness)
    assert set(am.all_cached("run_all")) == {KernelDAG, Liveness}
    am.bind({"run_all": graph.with_nodes(graph.nodes)})
    assert am.all_cached("run_all") == {}


def test_a_chosen_analysis_no_pass_computed_names_the_pass(tiny_module):
    am = analysis_manager(tiny_module.functions)
    with pytest.raises(
        AnalysisError,
        match=r"analysis 'StreamAssignment' of function 'run_all' was not computed: it has "
        r"options only a pass knows; run 'assign-streams' first",
    ):
        am.get("run_all", StreamAssignment)
    entry = next(iter(tiny_module.functions))  # a tenant's entry
    with pytest.raises(AnalysisError, match=rf"'MemoryPlan' of function '{entry}'.*'plan-memory'"):
        am.get(entry, MemoryPlan)
    assert am.cached("run_all", StreamAssignment) is None  # cached never computes
    with pytest.raises(AnalysisError, match=r"no function 'nope'.*functions: \["):
        am.get("nope", KernelDAG)


def test_a_plugged_in_kernel_model_is_what_the_passes_and_liveness_use(tiny_module):
    graph = tiny_module.functions["run_all"]
    first = next(iter(graph.tenants))

    def first_tenant_only(g):  # another kernel model: the kernels of one tenant
        return kernel_dag(g, [first])

    with pytest.raises(AnalysisError, match="has no kernel model: plug one in"):
        analysis_manager({"run_all": graph}).get("run_all", KernelDAG)  # no default model
    ours = kernel_dag(graph, [first])
    assert 0 < len(ours.kernels) < len(kernel_dag(graph).kernels)
    am = analysis_manager(providers={KernelDAG: first_tenant_only})
    _, records = run_passes(graph, [AssignStreams(policy="max"), PlanMemory()], CTX, analyses=am)
    assert records[0].info["kernels"] == len(ours.kernels) == records[-1].kernels_after
    assert {k for s in am.get("run_all", StreamAssignment).streams for k in s} == {
        k.name for k in ours.kernels
    }
    plan = am.get("run_all", MemoryPlan).functions["run_all"]
    assert plan.kernels == tuple(k.name for k in ours.kernels)
    assert am.get("run_all", Liveness).lifetimes == tuple(lifetimes(ours))


def test_a_derived_provider_reads_the_analyses_it_names(tiny_module):
    graph = tiny_module.functions["run_all"]
    am = analysis_manager(
        {"run_all": graph},
        {KernelDAG: kernel_dag, Liveness: Derived(lambda dag: Liveness.of(dag), (KernelDAG,))},
    )
    lives = am.get("run_all", Liveness)
    assert am.cached("run_all", KernelDAG) is not None  # computed on the way
    assert lives.kernels == tuple(k.name for k in am.get("run_all", KernelDAG).kernels)


def test_a_pass_run_on_its_own_gets_analyses_of_its_graph(tiny_module):
    graph = tiny_module.functions["run_all"]
    result = PlanMemory().run(graph, PassContext(kernels=PROVIDERS, kernel_model=kernel_dag))
    plan = result.analysis(MemoryPlan)
    assert plan.streams is None and set(plan.functions) == {"run_all"}
    assert plan.functions["run_all"].kernels == tuple(k.name for k in kernel_dag(graph).kernels)
    assert result.analysis(StreamAssignment) is None


def test_a_pass_on_a_graph_its_manager_does_not_hold_keeps_the_plugged_provider(tiny_module):
    graph = tiny_module.functions["run_all"]
    count = Counting()
    am = analysis_manager(tiny_module.functions, {KernelDAG: count})
    other = graph.with_nodes(graph.nodes)  # not the graph the manager holds for run_all
    result = PlanMemory().run(other, PassContext(kernels=PROVIDERS, analyses=am))
    assert count.graphs == [other]  # the plugged model, on the graph the pass got
    assert am.all_cached("run_all") == {}  # the build's manager is left alone
    assert result.analysis(MemoryPlan).functions["run_all"].kernels == tuple(
        k.name for k in kernel_dag(other).kernels
    )
