"""The multi-tenant scheduler (`mtcompile.serving`): per-request outputs equal ``Bundle.run``,
requests of a dynamic tenant stack into one call, bounded queues, a bad request fails
alone, close drains or fails what is pending, and concurrent submitters get their own
answers. Ordering is arranged with ``start=False`` (every request queued before the loop
takes any) and futures, never with sleeps or timings."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

import mtcompile
from mtcompile import Tenant, models
from mtcompile.errors import InputError, QueueFullError, SchedulerClosedError
from mtcompile.runtime.manifest import IOSpec, TenantSig
from mtcompile.serving import BatchDim, Scheduler, batch_dim

D_IN, BOUND, PAIR_BOUND = 16, 8, 4
TOL = {"atol": 1e-5, "rtol": 1e-5}  # a stacked call against one request's own call
WAIT = 60  # seconds a test waits for a future at most (a hang fails, it does not block)


class Pair(nn.Module):
    """relu(x @ W) + y on (n, 6) and (n, 4)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.fc = nn.Linear(6, 4)
        self.eval()

    def forward(self, x, y):
        return torch.relu(self.fc(x)) + y


@pytest.fixture(scope="module")
def bundle():
    """One compile: "dyn" (an mlp, batch in [1, 8]), "pair" (fx, two inputs of n rows, n in
    [1, 4]) and "stat" (an mlp of static batch 2)."""
    dyn, (x,) = models.mlp(seed=0, batch=2, d_in=D_IN, hidden=32, d_out=8)
    stat, (xs,) = models.mlp(seed=1, batch=2, d_in=D_IN, hidden=32, d_out=8)
    return mtcompile.compile(
        [
            Tenant(
                "dyn",
                dyn,
                example_inputs=(x,),
                dynamic_shapes={"x": {0: Dim("batch", min=1, max=BOUND)}},
            ),
            Tenant(
                "pair",
                torch.fx.symbolic_trace(Pair()),
                input_shapes={"x": (("n", 6), "float32"), "y": (("n", 4), "float32")},
                dim_bounds={"n": (1, PAIR_BOUND)},
            ),
            Tenant("stat", stat, example_inputs=(xs,)),
        ],
        name="serving",
    )


def request(tenant: str, rows: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    if tenant == "pair":
        return (
            rng.standard_normal((rows, 6), np.float32),
            rng.standard_normal((rows, 4), np.float32),
        )
    return (rng.standard_normal((2 if tenant == "stat" else rows, D_IN), np.float32),)


def check(bundle, tenant: str, inputs, future) -> None:
    got = future.result(timeout=WAIT)
    want = bundle.run(tenant, *inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, **TOL)


def test_batch_dims_from_the_signatures(bundle):
    s = Scheduler(bundle, start=False)
    assert s.batch_dim("dyn") == BatchDim("batch", BOUND, (0,), (0,))
    assert s.batch_dim("pair") == BatchDim("n", PAIR_BOUND, (0, 0), (0,))
    assert s.batch_dim("stat") is None
    assert Scheduler(bundle, no_stack=["dyn"], start=False).batch_dim("dyn") is None
    with pytest.raises(InputError, match=r"no_stack names unknown tenants \['nope'\]"):
        Scheduler(bundle, no_stack=["nope"], start=False)


def test_batch_dim_needs_the_plain_dim_in_every_output():
    x = IOSpec("x", ("b", 3), "float32", dims={"b": (1, 4)})
    sig = TenantSig("onnx", "", (x,), (IOSpec("y", ("b * 2",), "float32", dims={"b": (1, 4)}),))
    assert batch_dim(sig) is None  # an expression: the rows per request are not plain
    sig = TenantSig("onnx", "", (x,), (IOSpec("y", (3,), "float32"),))
    assert batch_dim(sig) is None  # a reduction over the batch
    sig = TenantSig("onnx", "", (x,), (IOSpec("y", (3, "b"), "float32", dims={"b": (1, 4)}),))
    assert batch_dim(sig) == BatchDim("b", 4, (0,), (1,))


def test_outputs_equal_run_and_requests_stack(bundle):
    sizes = {"dyn": [1, 3, 2], "pair": [1, 2], "stat": [1, 1, 1]}
    s = Scheduler(bundle, start=False)
    sent = [
        (t, xs, s.submit(t, *xs))
        for t, ns in sizes.items()
        for i, n in enumerate(ns)
        for xs in [request(t, n, seed=10 * i + n)]
    ]
    s.start()
    for t, xs, f in sent:
        check(bundle, t, xs, f)
    s.close()
    m = s.metrics()
    # window 1: every tenant has work (dyn: 3 requests, 6 rows; pair: 2, 3 rows): run_all;
    # then the static tenant's two other requests, one per window, through its entry
    assert m["calls"] == {"run_all": 1, "run": 2}
    assert m["tenants"]["dyn"]["batch_sizes"] == {3: 1}
    assert m["tenants"]["dyn"]["batch_rows"] == {6: 1}
    assert m["tenants"]["pair"]["batch_sizes"] == {2: 1}
    assert m["tenants"]["stat"]["batch_sizes"] == {1: 3}
    assert m["tenants"]["stat"]["calls"] == {"run": 2, "run_all": 1}
    for t, ns in sizes.items():
        tm = m["tenants"][t]
        assert (tm["done"], tm["failed"], tm["rejected"], tm["queue_depth"]) == (len(ns), 0, 0, 0)
        lat = tm["latency_ms"]
        assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"]


def test_stacking_stops_at_the_bound(bundle):
    s = Scheduler(bundle, start=False)
    sent = [(xs, s.submit("dyn", *xs)) for i in range(5) for xs in [request("dyn", 3, i)]]
    s.start()
    for xs, f in sent:
        check(bundle, "dyn", xs, f)
    s.close()
    m = s.metrics()
    assert m["tenants"]["dyn"]["batch_rows"] == {3: 1, 6: 2}  # 3 + 3 + 3 > BOUND
    assert m["tenants"]["dyn"]["batch_sizes"] == {1: 1, 2: 2}
    assert m["calls"] == {"run": 3}  # the other tenants have no work: their entries only


def test_full_queue_rejects(bundle):
    s = Scheduler(bundle, max_queue=2, start=False)
    kept = [s.submit("stat", *request("stat", 2, i)) for i in range(2)]
    with pytest.raises(
        QueueFullError,
        match=r"tenant 'stat': its queue is full \(2 requests "
        r"waiting, max_queue=2\).*larger max_queue",
    ):
        s.submit("stat", *request("stat", 2, 3))
    s.submit("dyn", *request("dyn", 1, 0)).cancel()  # another tenant's queue is its own
    assert s.metrics()["tenants"]["stat"]["rejected"] == 1
    assert s.metrics()["tenants"]["stat"]["queue_depth"] == 2
    s.close(drain=True)
    assert all(len(f.result(timeout=WAIT)) == 1 for f in kept)


def test_bad_inputs_fail_at_submit_with_runs_words(bundle):
    with Scheduler(bundle) as s:
        good = request("dyn", 2, 0)
        f = s.submit("dyn", *good)
        with pytest.raises(InputError, match=r"unknown tenant 'nope'.*\['dyn', 'pair', 'stat'\]"):
            s.submit("nope", *good)
        bad = (np.zeros((2, D_IN + 1), np.float32),)
        with pytest.raises(InputError) as at_run:
            bundle.run("dyn", *bad)
        with pytest.raises(InputError) as at_submit:
            s.submit("dyn", *bad)
        assert str(at_submit.value) == str(at_run.value)
        with pytest.raises(InputError, match=r"dim 0 \('batch'\) is 9, outside"):
            s.submit("dyn", np.zeros((BOUND + 1, D_IN), np.float32))
        check(bundle, "dyn", good, f)
    assert s.metrics()["tenants"]["dyn"]["failed"] == 2


class Flaky:
    """The bundle, except that a call whose inputs hold a NaN raises (as a kernel's run-time
    check would): a request that passes submit's checks and fails in its call."""

    def __init__(self, bundle):
        self.manifest, self._bundle = bundle.manifest, bundle

    @staticmethod
    def _check(arrays) -> None:
        if any(np.isnan(a).any() for a in arrays):
            raise ValueError("NaN in the inputs")

    def run(self, tenant, *arrays):
        self._check(arrays)
        return self._bundle.run(tenant, *arrays)

    def run_all(self, inputs):
        self._check([a for xs in inputs.values() for a in xs])
        return self._bundle.run_all(inputs)


def test_a_bad_request_fails_alone(bundle):
    s = Scheduler(Flaky(bundle), start=False)
    bad = np.full((2, D_IN), np.nan, np.float32)
    sent = [
        ("dyn", request("dyn", 1, 0)),
        ("dyn", (bad,)),
        ("dyn", request("dyn", 3, 1)),
        ("pair", request("pair", 2, 2)),
        ("stat", request("stat", 2, 3)),
    ]
    futures = [s.submit(t, *xs) for t, xs in sent]
    s.start()
    with pytest.raises(ValueError, match="NaN in the inputs"):
        futures[1].result(timeout=WAIT)
    for (t, xs), f in zip(sent, futures, strict=True):
        if f is not futures[1]:
            check(bundle, t, xs, f)
    s.close()
    m = s.metrics()
    # run_all raised -> each tenant's entry; dyn's stacked call raised -> one by one
    assert m["calls"] == {"retry": 3, "run": 3, "run_all": 1}
    assert (m["tenants"]["dyn"]["done"], m["tenants"]["dyn"]["failed"]) == (2, 1)
    assert (m["tenants"]["stat"]["done"], m["tenants"]["stat"]["failed"]) == (1, 0)


class Shared:
    """Two static tenants that share their input "frame" (no compile): outputs frame * k."""

    def __init__(self):
        spec = IOSpec("x", (2,), "float32", shared_as="frame")
        sig = TenantSig("fx", "", (spec,), (IOSpec("y", (2,), "float32"),))
        self.manifest = SimpleNamespace(
            tenant_order=("a", "b"),
            tenants={"a": sig, "b": sig},
            run_all_inputs=((("a", "x"), ("b", "x")),),
        )
        self.calls: list[str] = []

    def run(self, tenant, x):
        self.calls.append(tenant)
        return [x * (1 if tenant == "a" else 2)]

    def run_all(self, inputs):
        self.calls.append("run_all")
        return {t: [inputs[t][0] * (1 if t == "a" else 2)] for t in inputs}


def test_a_shared_input_merges_only_when_the_values_agree():
    fake = Shared()
    s = Scheduler(fake, start=False)
    one, two = np.ones(2, np.float32), np.full(2, 2, np.float32)
    sent = [s.submit("a", one), s.submit("b", one), s.submit("a", one), s.submit("b", two)]
    s.close()
    assert fake.calls == ["run_all", "a", "b"]  # window 2: one value per shared input broken
    for f, want in zip(sent, (one, 2 * one, one, 2 * two), strict=True):
        np.testing.assert_array_equal(f.result(timeout=WAIT)[0], want)


def test_close_with_drain_loses_none(bundle):
    s = Scheduler(bundle, max_delay_ms=60_000)  # a window that only close cuts short
    sent = [
        (t, xs, s.submit(t, *xs))
        for i in range(12)
        for t in ("dyn", "pair", "stat")
        for xs in [request(t, 1 + i % 3, i)]
    ]
    s.close(drain=True)
    assert all(f.done() for _, _, f in sent)
    for t, xs, f in sent:
        check(bundle, t, xs, f)
    with pytest.raises(SchedulerClosedError, match="tenant 'dyn': the scheduler is closed"):
        s.submit("dyn", *request("dyn", 1, 0))
    assert s.metrics()["tenants"]["dyn"]["rejected"] == 1


def test_close_never_started_drains(bundle):
    s = Scheduler(bundle, start=False)
    xs = request("stat", 2, 0)
    f = s.submit("stat", *xs)
    s.close()
    check(bundle, "stat", xs, f)


def test_close_without_drain_fails_pending(bundle):
    s = Scheduler(bundle, start=False)
    futures = [s.submit("dyn", *request("dyn", 2, i)) for i in range(3)]
    s.close(drain=False)
    for f in futures:
        with pytest.raises(SchedulerClosedError, match="closed with drain=False"):
            f.result(timeout=WAIT)
    m = s.metrics()["tenants"]["dyn"]
    assert (m["done"], m["failed"], m["queue_depth"]) == (0, 3, 0)
    with pytest.raises(SchedulerClosedError, match="cannot start again"):
        s.start()


def test_a_cancelled_request_is_not_run(bundle):
    s = Scheduler(bundle, start=False)
    xs = [request("dyn", 2, i) for i in range(3)]
    futures = [s.submit("dyn", *x) for x in xs]
    assert futures[1].cancel()
    s.close()
    check(bundle, "dyn", xs[0], futures[0])
    check(bundle, "dyn", xs[2], futures[2])
    assert futures[1].cancelled()
    assert s.metrics()["tenants"]["dyn"]["batch_rows"] == {4: 1}


def test_concurrent_submitters_get_their_own_answers(bundle):
    threads, per_thread = 8, 25
    start = threading.Barrier(threads)
    results: dict[int, list] = {}

    def submitter(k: int) -> None:
        rng = np.random.default_rng(k)
        mine = []
        start.wait(timeout=WAIT)
        for i in range(per_thread):
            t = ("dyn", "pair", "stat")[rng.integers(3)]
            xs = request(t, int(rng.integers(1, PAIR_BOUND + 1)), seed=1000 * k + i)
            mine.append((t, xs, s.submit(t, *xs)))
        results[k] = mine

    with Scheduler(bundle, max_delay_ms=1.0, max_queue=threads * per_thread) as s:
        workers = [threading.Thread(target=submitter, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=WAIT)
        assert sorted(results) == list(range(threads))
        for mine in results.values():
            for t, xs, f in mine:
                check(bundle, t, xs, f)
    m = s.metrics()
    assert sum(m["tenants"][t]["done"] for t in m["tenants"]) == threads * per_thread
    assert all(m["tenants"][t]["failed"] == m["tenants"][t]["rejected"] == 0 for t in m["tenants"])


LEAN_CHILD = textwrap.dedent("""
    import importlib.abc, json, sys
    class _Block(importlib.abc.MetaPathFinder):  # a serving host: no compiler, no torch
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("tvm", "torch", "onnx"):
                raise ImportError(f"{name} is blocked in this process")
    sys.meta_path.insert(0, _Block())
    import numpy as np
    import mtcompile
    from mtcompile.serving import Scheduler
    b = mtcompile.load(sys.argv[1], threads=1)
    z = np.load(sys.argv[2])
    with Scheduler(b, start=False) as s:
        futures = [s.submit("dyn", z[k]) for k in sorted(z.files)]
        s.start()
        outs = [f.result(timeout=60)[0] for f in futures]
    np.savez(sys.argv[3], *outs)
    print(json.dumps({"imported": sorted(m for m in sys.modules
                                         if m.split(".")[0] in ("tvm", "torch", "onnx")),
                      "batch_sizes": s.metrics()["tenants"]["dyn"]["batch_sizes"]}))
""")


def test_a_serving_host_runs_the_scheduler_without_compiler_or_torch(bundle, tmp_path):
    bundle.save(tmp_path / "b")
    xs = {f"r{i}": request("dyn", 1 + i, i)[0] for i in range(3)}
    np.savez(tmp_path / "in.npz", **xs)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LEAN_CHILD,
            str(tmp_path / "b"),
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"imported": [], "batch_sizes": {"3": 1}}  # 1 + 2 + 3 rows, one call
    got = np.load(tmp_path / "out.npz")
    for i, k in enumerate(sorted(xs)):
        np.testing.assert_allclose(got[f"arr_{i}"], bundle.run("dyn", xs[k])[0], **TOL)
