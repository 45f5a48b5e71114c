"""Stream assignment: Dilworth widths, minimal syncs, simulated schedules, merging, policies,
happens-before, and the assign-streams pass on a real demo graph (no TVM compile)."""

from __future__ import annotations

import itertools
import random

import networkx as nx
import pytest

from mtcompile.analysis.streams import (
    DeadlockError,
    StreamAssignment,
    assign,
    check,
    happens_before,
    merge_chains,
    min_chain_cover,
    minimal_syncs,
    simulate,
)


def dag(edges: str, extra: str = "") -> tuple[list[str], dict[str, list[str]]]:
    """'a>b b>c' -> (nodes in a topological order, deps); `extra` adds isolated nodes."""
    g = nx.DiGraph()
    g.add_nodes_from(extra.split())
    g.add_edges_from(tuple(e.split(">")) for e in edges.split())
    order = list(nx.lexicographical_topological_sort(g))
    return order, {k: sorted(g.predecessors(k)) for k in order}


def random_dag(seed: int, n: int | None = None) -> tuple[list[str], dict[str, list[str]]]:
    rng = random.Random(seed)
    n = n or rng.randint(1, 30)
    p = rng.choice([0.05, 0.1, 0.2, 0.4])
    order = [f"k{i}" for i in range(n)]
    deps = {k: [order[j] for j in range(i) if rng.random() < p] for i, k in enumerate(order)}
    return order, deps


def width_brute_force(order, deps) -> int:
    closure = nx.transitive_closure_dag(nx.DiGraph([(d, k) for k, ds in deps.items() for d in ds]))
    closure.add_nodes_from(order)
    for r in range(len(order), 0, -1):
        for subset in itertools.combinations(order, r):
            if not any(
                closure.has_edge(a, b) or closure.has_edge(b, a)
                for a, b in itertools.combinations(subset, 2)
            ):
                return r
    return 0


# ------------------------------------------------------------------ Dilworth widths


@pytest.mark.parametrize(
    "edges,extra,width",
    [
        ("a>b b>c", "", 1),  # a chain
        ("", "a b c d e", 5),  # an antichain
        ("a>b a>c b>d c>d", "", 2),  # a diamond
        ("a1>a2 a2>a3 b1>b2 c1>c2 c2>c3 c3>c4", "", 3),  # three disjoint chains
        ("s>x1 s>x2 s>x3 s>x4 x1>t x2>t x3>t x4>t", "", 4),  # fork-join of four
        # two full layers of 3 then 2: width 3 although 3 sources feed everything
        ("a>d a>e b>d b>e c>d c>e", "", 3),
        # closure matters: a>b>c and a>x, c>y: chains may skip (a, c) -> width 2
        ("a>b b>c a>x c>y x>y", "", 2),
    ],
)
def test_streams_equal_dag_width(edges, extra, width):
    order, deps = dag(edges, extra)
    chains = min_chain_cover(order, deps)
    assert len(chains) == width
    a = assign(order, deps, policy="max")
    assert a.num_streams == width == a.logical_concurrency
    check(a, order, deps)


@pytest.mark.parametrize("seed", range(60))
def test_chain_cover_is_width_on_small_random_dags(seed):
    order, deps = random_dag(seed, n=random.Random(seed).randint(1, 10))
    assert len(min_chain_cover(order, deps)) == width_brute_force(order, deps)


# ------------------------------------------------------------------ syncs, hand-checked


def test_diamond_needs_two_syncs():
    order, deps = dag("a>b a>c b>d c>d")
    streams = [["a", "b", "d"], ["c"]]
    assert minimal_syncs(streams, order, deps) == [("a", "c"), ("c", "d")]


def test_sync_implied_by_program_order_is_dropped():
    # x1 > x2 on stream 0; y reads both: waiting for x2 already waits for x1
    order, deps = dag("x1>x2 x2>x3 x1>y x2>y")
    assert minimal_syncs([["x1", "x2", "x3"], ["y"]], order, deps) == [("x2", "y")]


def test_sync_implied_by_another_sync_and_consumer_order_is_dropped():
    # b1 waits for a1; b2 comes after b1 on its stream, so a1 > b2 needs no wait of its own
    order, deps = dag("a1>a2 b1>b2 a1>b1 a1>b2")
    assert minimal_syncs([["a1", "a2"], ["b1", "b2"]], order, deps) == [("a1", "b1")]


def test_sync_implied_through_a_third_stream_is_dropped():
    order, deps = dag("p>q q>r p>r")
    assert minimal_syncs([["p"], ["q"], ["r"]], order, deps) == [("p", "q"), ("q", "r")]


def test_same_stream_edges_need_no_sync():
    order, deps = dag("a>b b>c a>c")
    assert minimal_syncs([["a", "b", "c"]], order, deps) == []


# ------------------------------------------------------------------ random DAGs, simulated


@pytest.mark.parametrize("seed", range(300))
def test_random_dags_run_every_dependency_in_order_without_deadlock(seed):
    rng = random.Random(1000 + seed)
    order, deps = random_dag(seed)
    cost = {k: rng.uniform(0.5, 20.0) for k in order}
    cap = rng.choice([None, 1, 2, 3])
    a = assign(order, deps, policy="max", max_streams=cap, cost_us=cost)
    sched = check(a, order, deps, cost)  # every kernel once, in order, deps enforced
    assert a.num_streams == min(len(min_chain_cover(order, deps)), cap or len(order))
    assert sched.makespan <= sum(cost.values()) + 1e-9
    before = happens_before(a)
    for s in range(len(a.syncs)):  # minimal: dropping any one sync loses a dependency
        fewer = StreamAssignment(a.streams, a.syncs[:s] + a.syncs[s + 1 :])
        lost = happens_before(fewer)
        assert any(not lost(d, k) for k, ds in deps.items() for d in ds)
    for x, y in itertools.combinations(order, 2):  # acyclic: never both ways
        assert not (before(x, y) and before(y, x))


def test_checker_catches_a_missing_sync_and_a_deadlock():
    order, deps = dag("a>b c>d a>d c>b")
    good = assign(order, deps, policy="max")
    check(good, order, deps)
    missing = StreamAssignment(good.streams, good.syncs[1:])
    with pytest.raises(AssertionError, match="not enforced"):
        check(missing, order, deps)
    # each stream waits for a kernel the other runs after its wait: a cycle
    cyclic = StreamAssignment((("a", "b"), ("c", "d")), (("d", "a"), ("b", "c")))
    with pytest.raises(DeadlockError):
        simulate(cyclic, dict.fromkeys(order, 1.0))


# ------------------------------------------------------------------ merging and policies


def test_max_streams_merges_the_two_cheapest_chains_in_program_order():
    order, deps = dag("a1>a2 b1>b2 c1>c2 d1>d2")
    cost = {"a1": 0.5, "a2": 0.5, "b1": 1, "b2": 1, "c1": 1.5, "c2": 1.5, "d1": 2, "d2": 2}
    chains = min_chain_cover(order, deps)
    assert len(chains) == 4
    # A(1) + B(2) -> AB(3); then C(3) and AB(3) are the cheapest -> ABC(6), D(4)
    merged = merge_chains(chains, 2, order, cost)
    assert sorted(map(set, merged), key=len) == [{"d1", "d2"}, {"a1", "a2", "b1", "b2", "c1", "c2"}]
    pos = {k: i for i, k in enumerate(order)}
    assert all(pos[x] < pos[y] for c in merged for x, y in zip(c, c[1:], strict=False))
    a = assign(order, deps, policy="max", max_streams=2, cost_us=cost)
    assert a.num_streams == 2 and a.num_syncs == 0
    check(a, order, deps)


def test_streams_one_is_sequential_program_order():
    order, deps = dag("a>b a>c b>d c>d", "e")
    a = assign(order, deps, streams=1)
    assert a.streams == (tuple(order),) and a.syncs == () and a.policy == "sequential"
    assert a.estimated_speedup == 1.0 and a.logical_concurrency == 3


def test_auto_keeps_streams_that_pay_and_falls_back_when_they_do_not():
    order, deps = dag("a1>a2 b1>b2")
    cost = dict.fromkeys(order, 10.0)
    kept = assign(order, deps, cost_us=cost)  # two equal independent chains: 2x
    assert kept.num_streams == 2 and kept.estimated_speedup == pytest.approx(2.0)
    # sharing the device makes every kernel 2x slower: no gain, back to one stream
    slow = assign(
        order, deps, cost_us=cost, concurrent_cost_us=lambda n: {k: c * n for k, c in cost.items()}
    )
    assert slow.num_streams == 1 and slow.policy == "auto"
    assert slow.info["fell_back_from"] == pytest.approx(1.0)
    forced = assign(order, deps, cost_us=cost, policy="max", lanes=1)
    assert forced.num_streams == 2 and forced.estimated_speedup == pytest.approx(1.0)


def test_bad_options_fail_clearly():
    order, deps = dag("a>b")
    with pytest.raises(ValueError, match="policy"):
        assign(order, deps, policy="fastest")
    with pytest.raises(ValueError, match="not topological"):
        assign(["b", "a"], deps)


def test_happens_before_is_program_order_and_syncs_only():
    order, deps = dag("a>b c>d a>d")
    a = assign(order, deps, policy="max")
    before = happens_before(a)
    assert before("a", "b") and before("a", "d") and before("c", "d")
    assert not before("b", "a") and not before("a", "a")
    assert not before("a", "c") and not before("c", "a")  # may run at once
    assert not before("b", "d") and not before("d", "b")


# ------------------------------------------------------------------ the pass on a demo graph


def _demo_graph(passes):
    from mtcompile.api import _front, _Stages
    from mtcompile.backend.kernels import resolve_providers
    from mtcompile.models import get_set
    from mtcompile.passes import build_pipeline

    providers = resolve_providers("llvm", None)
    names = ["dedup", "fuse-horizontal", "eliminate-dead-nodes", "fuse-vertical"]
    pipeline = build_pipeline(names + [p for p, _ in passes], dict(passes))
    module, _, _, records, am = _front(
        get_set("heterogeneous"), "llvm", pipeline, (), _Stages(lambda _m: None), providers
    )
    return module.functions["run_all"], records[-1], am


@pytest.mark.slow  # imports the demo set
def test_pass_on_heterogeneous_demo():
    from mtcompile.analysis.schedule import KernelDAG
    from mtcompile.backend.emitted import kernel_dag

    graph, record, am = _demo_graph([("assign-streams", {"policy": "max"})])
    a = am.get("run_all", StreamAssignment)
    dag_ = kernel_dag(graph)
    assert am.get("run_all", KernelDAG) == dag_
    order = [k.name for k in dag_.kernels]
    check(a, order, dag_.deps)
    assert a.num_streams == len(min_chain_cover(order, dag_.deps)) >= 3  # 3 tenants at least
    assert {k for s in a.streams for k in s} == set(order)
    assert not record.changed and record.info["num_streams"] == a.num_streams
    assert record.info["num_syncs"] == a.num_syncs and record.info["policy"] == "max"
    import json

    json.dumps(record.info)


@pytest.mark.slow  # imports the demo set
def test_pass_streams_one_and_auto_on_two_cores():
    _, record, am = _demo_graph([("assign-streams", {"streams": 1})])
    assert am.get("run_all", StreamAssignment).num_streams == 1 and record.info["num_syncs"] == 0
    _, record, am = _demo_graph([("assign-streams", {"cores": 2})])
    a = am.get("run_all", StreamAssignment)
    # 2 cores shared by the streams: the graph cost model predicts no gain -> one stream
    assert a.policy == "auto" and a.num_streams == 1 and record.info["fell_back_from"] < 1.1
