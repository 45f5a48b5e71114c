"""Issue 6 phase 2: run_all lowered into one Relax function per stream (plus event points)
inside the same executable, run concurrently by `StreamExecutor` from `Bundle.run_all`."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import tiny_tenants
from test_random_sets import random_set
from tvm import relax

import mtcompile
from mtcompile.analysis.memory import MemoryPlan, lifetimes, overlap_problems
from mtcompile.analysis.streams import StreamAssignment, happens_before
from mtcompile.api import _front, _Stages
from mtcompile.backend import lowering
from mtcompile.backend.emitted import kernel_dag
from mtcompile.backend.kernels import resolve_providers
from mtcompile.backend.lowering import _Emitter
from mtcompile.backend.stream_layout import stream_layout
from mtcompile.bundle_manifest import streams_info
from mtcompile.passes import DEFAULT_PIPELINE, build_pipeline
from mtcompile.runtime.executor import StreamError
from mtcompile.runtime.manifest import StreamsInfo
from mtcompile.tools.verify import seeded_run_all_inputs

# assign-streams before plan-memory, whether or not the default pipeline has it yet
PIPELINE = [p for p in DEFAULT_PIPELINE if p not in ("assign-streams", "plan-memory")] + [
    "assign-streams",
    "plan-memory",
]
MAX = {"assign-streams": {"policy": "max"}}


def _graph(tenants, options=None, pipeline=PIPELINE):
    providers = resolve_providers("llvm", None)
    module, *_, am = _front(
        tenants, "llvm", build_pipeline(pipeline, options), (), _Stages(lambda _m: None), providers
    )
    return module.functions["run_all"], am


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for t in a:
        for x, y in zip(a[t], b[t], strict=True):
            np.testing.assert_array_equal(x, y, err_msg=t)


# --------------------------------------------------------------------------- quick


@pytest.mark.slow  # imports and lowers the demo set
def test_layout_emits_every_kernel_once_and_orders_every_import():
    graph, am = _graph(tiny_tenants(), MAX)
    layout = stream_layout(am)
    a = am.get("run_all", StreamAssignment)
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


_GAP_ORDER = {"put": 0, "signal": 1, "wait": 2, "get": 3}


def _event_points(func, stages: list[set[str]]) -> list[tuple[str, int, int, list[str]]]:
    """A stream function's event points: (kind, id, how many stages precede it, the vars
    it passes), checking that each stands outside any dataflow block and between whole
    stages (`stages`: the var names of each stage's nodes, in order)."""
    points, seen = [], set()
    for blk in func.body.blocks:
        for b in blk.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, relax.ExternFunc):
                kind = str(v.op.global_symbol).rsplit(".", 1)[-1]
                assert not isinstance(blk, relax.DataflowBlock), kind  # impure: outside
                done = next(k for k in range(len(stages) + 1) if set().union(*stages[:k]) >= seen)
                assert seen == set().union(*stages[:done]), (kind, "inside a stage")
                points.append((kind, int(v.args[0].value), done, [a.name for a in v.args[1:]]))
            elif isinstance(blk, relax.DataflowBlock):
                seen.add(b.var.name)
    assert seen == set().union(*stages)  # the dataflow blocks hold the stages' nodes
    return points


@pytest.mark.slow  # imports and lowers the demo set
def test_event_points_are_emitted_at_lowering_between_the_stages():
    """Before any TVM pass: a wait right before its consumer's stage (a kernel of the
    stream) and a signal right after its producer's; a value of another stream fetched
    (get) right before the stage that reads it first, handed over (put) right after the
    stage that computes it; all outside the dataflow blocks; imports are no parameters."""
    graph, am = _graph(random_set(5), MAX)
    layout = stream_layout(am)
    a = am.get("run_all", StreamAssignment)
    assert a.syncs and any(layout.imports)
    em = _Emitter(graph, {})
    bb = relax.BlockBuilder()
    for i in range(len(layout.functions)):
        em.stream_function(bb, layout, i)
    mod = bb.get()
    pos = {k: (s, j) for s, ks in enumerate(a.streams) for j, k in enumerate(ks)}
    for i, fname in enumerate(layout.functions):
        func, names = mod[fname], em.var_names[fname]
        assert not func.is_pure
        assert [p.name for p in func.params[1:]] == [x.replace(".", "_") for x in layout.inputs[i]]
        points = _event_points(func, [{names[x] for x in st} for st in layout.emission[i]])
        got = {(kind, ident): (at, args) for kind, ident, at, args in points}
        assert len(got) == len(points)  # each event point once
        for e, (p, c) in enumerate(a.syncs):
            if pos[p][0] == i:
                assert got.pop(("signal", e))[0] == pos[p][1] + 1
            if pos[c][0] == i:
                assert got.pop(("wait", e))[0] == pos[c][1]
        for x in layout.exports[i]:
            stage = next(j for j, st in enumerate(layout.emission[i]) if x in st)
            assert got.pop(("put", layout.value_id[x])) == (stage + 1, [names[x]])
        for x in layout.imports[i]:
            first = next(
                j
                for j, st in enumerate(layout.emission[i])
                if any(x in layout.reads(n) for n in st)
            )
            assert got.pop(("get", layout.value_id[x]))[0] == first
        assert got == {}  # no other event points
        for gap in range(len(layout.emission[i]) + 1):
            kinds = [_GAP_ORDER[k] for k, _, at, _ in points if at == gap]
            assert kinds == sorted(kinds), (fname, gap)  # puts, signals, waits, then gets
        assert len(func.ret_ty.fields) == len(layout.outputs[i])


@pytest.mark.slow  # imports and lowers the demo set
def test_streams_plan_is_safe_under_happens_before_and_not_smaller():
    for tenants in (tiny_tenants(), random_set(5)):
        graph, am = _graph(tenants, MAX)
        _, seq = _graph(tenants, {"assign-streams": {"policy": "sequential"}})
        plan = am.get("run_all", MemoryPlan).functions["run_all"]
        dag = kernel_dag(graph)
        names = [k.name for k in dag.kernels]
        hb = happens_before(am.get("run_all", StreamAssignment))
        assert not overlap_problems(
            plan.slots,
            lifetimes(dag),
            plan.arena_bytes,
            plan.alignment,
            lambda a, b, hb=hb, n=names: hb(n[a], n[b]),
        )
        assert plan.arena_bytes >= seq.get("run_all", MemoryPlan).functions["run_all"].arena_bytes


@pytest.mark.slow  # imports and lowers the demo set
def test_no_layout_without_several_streams():
    _, am = _graph(tiny_tenants(), {"assign-streams": {"streams": 1}})
    assert stream_layout(am) is None


@pytest.mark.slow  # imports and lowers the demo set
def test_streams_manifest_with_one_stream_and_without_an_assignment():
    graph, am = _graph(tiny_tenants())  # auto: the executor's cost outweighs the gain
    m = streams_info(am, stream_layout(am))
    assert m.num_streams == 1 and m.policy == "auto" and m.syncs == () and m.run is None
    assert len(m.lanes) == len(kernel_dag(graph).kernels)
    # the lanes are the assignment's own estimate, laid out by the simulated schedule
    a = am.get("run_all", StreamAssignment)
    assert [r["end_us"] - r["start_us"] for r in m.lanes] == pytest.approx(
        [a.kernel_us[r["kernel"]] for r in m.lanes], abs=1e-2
    )
    _, bare = _graph(tiny_tenants(), pipeline=[p for p in PIPELINE if p != "assign-streams"])
    none = streams_info(bare, None)
    assert none == StreamsInfo() and (none.num_streams, none.num_syncs, none.policy) == (1, 0, None)


# --------------------------------------------------------------------------- compiled


def _pair(tenants):
    seq = mtcompile.compile(
        tenants, passes=PIPELINE, pass_options={"assign-streams": {"streams": 1}}
    )
    par = mtcompile.compile(tenants, passes=PIPELINE, pass_options=MAX)
    return seq, par


def _check_equal_many(seq, par, runs: int = 24):
    """The streamed run_all gives the same bits on every run (a race between streams would
    not), and matches the sequential one to float32 rounding: each stream runs its kernels
    on threads // streams threads, and the BLAS blocks its sums by the work each thread gets."""
    assert seq.num_streams == 1 and par.num_streams > 1
    first: dict[int, dict] = {}
    for r in range(runs):
        inputs = seeded_run_all_inputs(seq, r % 3)
        got = par.run_all(inputs)
        if r % 3 in first:
            assert_same(first[r % 3], got)
        else:
            first[r % 3] = got
            want = seq.run_all(inputs)
            for t in want:
                for x, y in zip(want[t], got[t], strict=True):
                    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=t)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heterogeneous", "shared-backbone"])
def test_demo_sets_streams_repeat_bit_for_bit_and_match_sequential(name, tmp_path):
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
    assert_same(par.run_all(inputs), loaded.run_all(inputs))


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

    # the PyTorch provider: its kernels are Python functions a test can swap for a failing one
    bundle = mtcompile.compile(hetero_tenants, passes=PIPELINE, pass_options=MAX, kernels="torch")
    calls = bundle.compile_report["build"]["library_calls"]
    symbol = library.MATMUL_BIAS
    assert bundle.num_streams > 1 and calls
    inputs = seeded_run_all_inputs(bundle, 0)
    # from a twin bundle: this one's stream VMs must first look the kernels up after the swap
    expected = mtcompile.compile(
        hetero_tenants, passes=PIPELINE, pass_options=MAX, kernels="torch"
    ).run_all(inputs)

    def boom(*_args):
        raise ValueError("injected kernel failure")

    library.register()
    tvm_ffi.register_global_func(symbol, boom, override=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(
            StreamError,
            match=rf"\(tenant \w+\) failed in kernel '{symbol}'.*"
            "injected kernel failure",
        ) as e:
            bundle.run_all(inputs)
        assert time.monotonic() - t0 < 30
        assert e.value.tenant in bundle.tenant_names
    finally:
        library._registered = False
        library.register()
    assert_same(expected, bundle.run_all(inputs))


@pytest.mark.slow
def test_a_value_handed_over_outside_the_arena_drops_the_streams_with_a_warning(monkeypatch):
    """Take the values streams hand to each other out of the plan: TVM's own plan could
    reuse their bytes while another stream reads them. The build finds it (naming the
    function and the value), warns, and builds run_all on one stream: right numbers."""
    exported: set[str] = set()
    emit, attr = lowering._Emitter.stream_function, lowering._arena_attr

    def stream_function(self, bb, layout, i):
        emit(self, bb, layout, i)
        exported.update(json.loads(self.stream_attrs[layout.functions[i]])["exports"])

    def without_exports(plan, var_names):
        out = attr(plan, var_names)
        for key in ("offsets", "sizes"):
            out[key] = {n: v for n, v in out[key].items() if n not in exported}
        return out

    monkeypatch.setattr(lowering._Emitter, "stream_function", stream_function)
    monkeypatch.setattr(lowering, "_arena_attr", without_exports)
    with pytest.warns(
        UserWarning,
        match=r"function 'run_all__s\d+': the memory plan does "
        r"not fit .*built on one stream instead",
    ):
        bundle = mtcompile.compile(random_set(1), passes=PIPELINE, pass_options=MAX)
    assert exported
    assert bundle.num_streams == 1  # run_all not lowered onto the streams
    assert "run_all__s" in bundle.compile_report["build"]["streams_dropped"]
    assert bundle.verify()["ok"]
