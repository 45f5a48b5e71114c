"""benchmarks.serve: bounded Poisson schedules, the mixes, the sustainable-rate rule, and one
short in-process trial on the tiny bundle that answers every request it sent."""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import serve as bench


def test_arrivals_are_bounded_sorted_and_seeded():
    plan = bench.arrivals({"a": 100.0, "b": 10.0, "c": 0.0}, duration=2.0, cap=10_000, seed=1)
    times = [t for t, _ in plan]
    assert times == sorted(times) and all(0 <= t < 2.0 for t in times)
    n = {k: sum(1 for _, x in plan if x == k) for k in "abc"}
    assert n["c"] == 0 and 140 < n["a"] < 260 and 2 < n["b"] < 40  # about rate x duration
    assert plan == bench.arrivals({"a": 100.0, "b": 10.0, "c": 0.0}, 2.0, 10_000, seed=1)
    assert len(bench.arrivals({"a": 1000.0}, 2.0, cap=50, seed=0)) == 50


def test_mixes():
    assert bench.mix_rates(["a", "b", "c"], "equal", 30) == {"a": 10, "b": 10, "c": 10}
    skew = bench.mix_rates(["a", "b", "c"], "skewed", 100)
    assert skew["a"] == 70 and np.isclose(skew["b"], 15) and np.isclose(skew["c"], 15)


def row(offered, p99, lost=0):
    return {
        "mix": "equal",
        "contender": "merged",
        "offered": offered,
        "sent": 1,
        "done": 1,
        "throughput": 1.0,
        "p50": 1.0,
        "p99": p99,
        "rejected": 0,
        "failed": 0,
        "lost": lost,
    }


def test_the_sustainable_rate_stops_at_the_first_miss():
    args = argparse.Namespace(
        bundle="b",
        via="inproc",
        max_delay_ms=2,
        duration=1,
        p99_ms=50,
        mixes=["equal"],
        contenders=["merged"],
    )
    text = bench.table([row(10, 5), row(20, 80), row(40, 5)], args, "cmd")
    assert text.rstrip().endswith("| equal | merged | 10 |")  # 40 passes, after a miss
    text = bench.table([row(10, 5), row(20, 5, lost=1)], args, "cmd")
    assert text.rstrip().endswith("| equal | merged | 10 |")
    text = bench.table([row(10, 90)], args, "cmd")
    assert text.rstrip().endswith("| equal | merged | below the lowest rate tried |")


def test_a_short_trial_answers_every_request(tiny_bundle):
    from mtcompile.runtime.inputs import seeded_inputs

    m = tiny_bundle.manifest
    inputs = {t: seeded_inputs(m.tenants[t], i) for i, t in enumerate(m.tenant_order)}
    sender = bench.InProc(tiny_bundle, 1.0, 1000)
    args = argparse.Namespace(duration=0.5, max_requests=60, drain=60.0)
    try:
        r = bench.trial(
            sender, inputs, bench.mix_rates(list(m.tenant_order), "equal", 90), args, seed=0
        )
    finally:
        sender.close()
    assert r["sent"] > 0 and r["done"] == r["sent"]
    assert r["rejected"] == r["failed"] == r["lost"] == 0 and r["p50"] <= r["p99"]
