"""Issue 6 phase 2: run_all lowered into one Relax function per stream (plus event points)
inside the same executable, run concurrently by `StreamExecutor` from `Bundle.run_all`."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import tiny_tenants
from test_random_sets import random_set

import mtcompile
from mtcompile.analysis.memory import lifetimes, overlap_problems
from mtcompile.analysis.schedule import kernel_dag
from mtcompile.analysis.streams import happens_before
from mtcompile.api import _front, _Stages, streams_manifest
from mtcompile.backend.kernels import resolve_providers
from mtcompile.backend.lowering import stream_layout
from mtcompile.passes import DEFAULT_PIPELINE, build_pipeline
from mtcompile.runtime.executor import StreamError
from mtcompile.tools.verify import seeded_run_all_inputs

# assign-streams before plan-memory, whether or not the default pipeline has it yet
PIPELINE = [p for p in DEFAULT_PIPELINE if p not in ("assign-streams", "plan-memory")] + [
    "assign-streams", "plan-memory"]
MAX = {"assign-streams": {"policy": "max"}}


def _graph(tenants, options=None, pipeline=PIPELINE):
    providers = resolve_providers("llvm", None)
    graph, *_ = _front(tenants, "llvm", build_pipeline(pipeline, options), (),
                       _Stages(lambda _m: None), providers)
    return graph, providers


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for t in a:
        for x, y in zip(a[t], b[t], strict=True):
            np.testing.assert_array_equal(x, y, err_msg=t)


# --------------------------------------------------------------------------- quick


def test_layout_emits_every_kernel_once_and_orders_every_import():
    graph, providers = _graph(tiny_tenants(), MAX)
    layout = stream_layout(graph, providers)
    a = graph.analyses["streams"]
    assert layout is not None and a.num_streams > 1
    before = happens_before(a)
    emitted = [x for stages in layout.emission for st in stages for x in st]
    owned = [x for x in emitted if x in layout.owner]
    assert sorted(owned) == sorted(set(owned))  # each kernel's nodes on one stream only
    for i, imports in enumerate(layout.imports):
        for x in imports:
            assert layout.owner[x] != i and x in layout.exports[layout.owner[x]]
    for i, ks in enumerate(a.streams):
        for e, (p, c) in enumerate(a.syncs):
            assert (e in sum(layout.signals[i].values(), [])) == (p in ks)
            assert (e in sum(layout.waits[i].values(), [])) == (c in ks)
            assert before(p, c)
    outs = sorted(j for idx in layout.output_index for j in idx)
    assert outs == list(range(sum(len(io.outputs) for io in graph.tenants.values())))


def test_streams_plan_is_safe_under_happens_before_and_not_smaller():
    for tenants in (tiny_tenants(), random_set(5)):
        graph, providers = _graph(tenants, MAX)
        seq_graph, _ = _graph(tenants, {"assign-streams": {"policy": "sequential"}})
        plan = graph.analyses["memory"].functions["run_all"]
        dag = kernel_dag(graph, providers)
        names = [k.name for k in dag.kernels]
        hb = happens_before(graph.analyses["streams"])
        assert not overlap_problems(plan.slots, lifetimes(dag), plan.arena_bytes,
                                    plan.alignment, lambda a, b, hb=hb, n=names: hb(n[a], n[b]))
        assert plan.arena_bytes >= seq_graph.analyses["memory"].functions["run_all"].arena_bytes


def test_no_layout_without_several_streams():
    graph, providers = _graph(tiny_tenants(), {"assign-streams": {"streams": 1}})
    assert stream_layout(graph, providers) is None


def test_streams_manifest_with_one_stream_and_without_an_assignment():
    graph, providers = _graph(tiny_tenants())  # auto: the executor's cost outweighs the gain
    m = streams_manifest(graph, providers, stream_layout(graph, providers))
    assert m["num_streams"] == 1 and m["policy"] == "auto" and m["syncs"] == []
    assert len(m["lanes"]) == len(kernel_dag(graph, providers).kernels)
    bare, _ = _graph(tiny_tenants(), pipeline=[p for p in PIPELINE if p != "assign-streams"])
    assert streams_manifest(bare, providers, None) == {
        "num_streams": 1, "num_syncs": 0, "estimated_speedup": 1.0, "policy": None}


# --------------------------------------------------------------------------- compiled


def _pair(tenants):
    seq = mtcompile.compile(tenants, passes=PIPELINE,
                            pass_options={"assign-streams": {"streams": 1}})
    par = mtcompile.compile(tenants, passes=PIPELINE, pass_options=MAX)
    return seq, par


def _check_equal_many(seq, par, runs: int = 24):
    assert seq.num_streams == 1 and par.num_streams > 1
    for r in range(runs):
        inputs = seeded_run_all_inputs(seq, r % 3)
        assert_same(seq.run_all(inputs), par.run_all(inputs))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heterogeneous", "shared-backbone"])
def test_demo_sets_streams_equal_sequential_bit_for_bit(name, tmp_path):
    from mtcompile.models import get_set

    seq, par = _pair(get_set(name))
    _check_equal_many(seq, par)
    assert par.verify()["ok"]
    rep = par.report()["streams"]
    assert rep["num_streams"] == par.num_streams and rep["num_syncs"] >= 1
    assert {"estimated_speedup", "policy", "lanes", "syncs"} <= rep.keys()
    assert {"kernel", "stream", "tenant", "start_us", "end_us"} <= rep["lanes"][0].keys()
    assert seq.report()["streams"]["num_streams"] == 1
    loaded = mtcompile.load(par.save(tmp_path / "b"))
    assert loaded.num_streams == par.num_streams
    inputs = seeded_run_all_inputs(seq, 7)
    assert_same(seq.run_all(inputs), loaded.run_all(inputs))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 5, 8])
def test_random_sets_streams_equal_sequential(seed):
    seq, par = _pair(random_set(seed))
    if par.num_streams == 1:
        pytest.skip("a DAG of width 1")
    _check_equal_many(seq, par, runs=20)


@pytest.mark.slow
def test_injected_kernel_error_surfaces_as_stream_error_then_recovers(hetero_tenants):
    import tvm_ffi

    from mtcompile.runtime import library

    bundle = mtcompile.compile(hetero_tenants, passes=PIPELINE, pass_options=MAX)
    calls = bundle.compile_report["build"]["library_calls"]
    symbol = library.MATMUL_BIAS
    assert bundle.num_streams > 1 and calls
    inputs = seeded_run_all_inputs(bundle, 0)
    expected = mtcompile.compile(hetero_tenants, passes=PIPELINE,
                                 pass_options={"assign-streams": {"streams": 1}}).run_all(inputs)

    def boom(*_args):
        raise ValueError("injected kernel failure")

    library.register()
    tvm_ffi.register_global_func(symbol, boom, override=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(StreamError, match=rf"\(tenant \w+\) failed in kernel '{symbol}'.*"
                                              "injected kernel failure") as e:
            bundle.run_all(inputs)
        assert time.monotonic() - t0 < 30
        assert e.value.tenant in bundle.tenant_names
    finally:
        library._registered = False
        library.register()
    assert_same(expected, bundle.run_all(inputs))
