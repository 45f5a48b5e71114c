"""Tuning over TVM's RPC tracker: a tracker and two RPC servers on 127.0.0.1, started here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import mtcompile
from mtcompile.api import tune
from mtcompile.backend.tuning import RECORDS
from mtcompile.backend.tuning_remote import Tracker, TrackerError
from mtcompile.cli import main

KEY = "mtc-test"
PASSES = ["dedup", "eliminate-dead-nodes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, what: str, timeout: float = 120.0) -> None:
    """Poll `cond` until true; fail naming `what` after a generous timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Cluster:
    """A tracker and RPC servers as subprocesses, each in its own process group (a server
    forks a child per session: killing the group is what losing the machine looks like)."""

    def __init__(self):
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.tracker = self._spawn(
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--port-end",
            str(self.port + 1),
        )
        self.servers: list[subprocess.Popen] = []

    def _spawn(self, module: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(p)
        return p

    def _tracker_up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self) -> int:
        return Tracker("127.0.0.1", self.port, KEY).servers()

    def add_servers(self, n: int) -> None:
        """Start `n` servers at once (each imports TVM: seconds) and wait for the tracker to
        list them (a server that finds no tracker yet retries)."""
        for _ in range(n):
            port = free_port()
            self.servers.append(
                self._spawn(
                    "tvm.exec.rpc_server",
                    "--tracker",
                    self.address,
                    "--key",
                    KEY,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--port-end",
                    str(port + 1),
                )
            )
        wait_for(self._tracker_up, "the tracker to listen")
        want = len([s for s in self.servers if s.poll() is None])
        wait_for(lambda: self.count() >= want, f"{want} server(s) on the tracker")

    def in_session(self) -> subprocess.Popen | None:
        """A server serving a session now: beside its popen worker, a process per session."""
        import psutil

        for s in self.servers:
            try:
                if s.poll() is None and len(psutil.Process(s.pid).children(recursive=True)) > 1:
                    return s
            except psutil.NoSuchProcess:
                pass
        return None

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)

    def close(self) -> None:
        for p in reversed(self.procs):
            self.kill(p)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.add_servers(2)
        yield c
    finally:
        c.close()


def two_tenants() -> list[mtcompile.Tenant]:
    from mtcompile.models import mlp_fx

    tenants = []
    for seed, name in enumerate(["a", "b"]):
        gm, shapes = mlp_fx(seed=seed, batch=2, d_in=16, hidden=32, d_out=8, layers=1)
        tenants.append(mtcompile.Tenant(name, gm, input_shapes=shapes))
    return tenants


SPEC = """
[[tenants]]
name = "a"
factory = "mtcompile.models:mlp_fx"
args = { seed = 0, batch = 2, d_in = 16, hidden = 32, d_out = 8, layers = 1 }

[[tenants]]
name = "b"
factory = "mtcompile.models:mlp_fx"
args = { seed = 1, batch = 2, d_in = 16, hidden = 32, d_out = 8, layers = 1 }

[pipeline]
passes = ["dedup", "eliminate-dead-nodes"]
"""


def records(db) -> int:
    return (db / RECORDS).read_text().count("\n")


def check_numerics(db) -> None:
    """A build with the database matches PyTorch on both tenants."""
    from mtcompile.models import mlp

    bundle = mtcompile.compile(two_tenants(), passes=PASSES, kernels="tvm", tuning_db=str(db))
    for seed, name in enumerate(["a", "b"]):
        model, (x,) = mlp(seed=seed, batch=2, d_in=16, hidden=32, d_out=8, layers=1)
        with torch.no_grad():
            want = model(x).numpy()
        (got,) = bundle.run(name, x.numpy())
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tuned(cluster, tmp_path_factory):
    """A database tuned over the tracker (4 trials) while one server is killed mid-session.

    Returns (database, tune's result, the server killed while serving a session or None).
    """
    import threading

    db = tmp_path_factory.mktemp("tune_rpc") / "db"
    killed, measuring, done = [], threading.Event(), threading.Event()

    def killer():
        # after the tracker check (its session is not a measurement); a measurement holds its
        # session for over 100 ms (MetaSchedule's min_repeat_ms): polling every 10 ms finds one
        measuring.wait()
        while not done.is_set():
            if (busy := cluster.in_session()) is not None:
                Cluster.kill(busy)  # with the session it is serving
                killed.append(busy)
                return
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        res = tune(
            two_tenants(),
            str(db),
            trials=4,
            passes=PASSES,
            rpc_tracker=cluster.address,
            rpc_key=KEY,
            builders=2,
            progress=lambda line: line.startswith("tuning ") and measuring.set(),
        )
    finally:
        measuring.set()
        done.set()
        t.join(timeout=60)
    return db, res, killed[0] if killed else None


@pytest.mark.slow
def test_a_server_killed_mid_run_costs_candidates_not_the_run(cluster, tuned):
    db, res, killed = tuned
    assert killed is not None and killed.poll() is not None
    # the run finished: every candidate is in the database, those lost with the server as
    # failed runs (the survivor measured the others)
    assert res["servers"] == 2 and res["measured"] == 4 and records(db) == 4
    (row,) = res["table"]
    assert row["trials"] == 4 and row["failed"] < 4 and row["best_us"] > 0
    assert row["tenants"] == ["a", "b", "run_all"]
    wait_for(lambda: cluster.count() == 1, "the tracker to drop the killed server")
    check_numerics(db)


@pytest.mark.slow
def test_a_resumed_run_measures_only_the_missing_trials(cluster, tuned, tmp_path):
    import shutil

    db = tmp_path / "db"
    shutil.copytree(tuned[0], db)
    lines, rows = [], []
    before = tuned[1]["table"][0]
    ok = before["trials"] - before["failed"]  # failed runs are not counted: measured again

    def ctrl_c(_n, _total):
        os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C stops the run after the batch being measured, which the database keeps
    with pytest.raises(KeyboardInterrupt):
        tune(
            two_tenants(),
            str(db),
            trials=6,
            passes=PASSES,
            rpc_tracker=cluster.address,
            rpc_key=KEY,
            builders=2,
            progress=lines.append,
            on_trials=ctrl_c,
            on_task=rows.append,
        )
    assert any(
        ln.startswith("tuning 1 of 1 task(s), up to 6 trial(s) each (4 already") for ln in lines
    )
    assert records(db) == 10 - ok and rows[-1]["trials"] == 10 - ok
    # run again: only candidates that failed (none on a healthy server) are measured anew
    res = tune(
        two_tenants(),
        str(db),
        trials=6,
        passes=PASSES,
        rpc_tracker=cluster.address,
        rpc_key=KEY,
        builders=2,
    )
    assert res["resumed_from"] == 10 - ok
    assert res["measured"] == rows[-1]["failed"] - before["failed"]
    (row,) = res["table"]
    assert row["trials"] - row["failed"] == 6 and row["best_us"] <= before["best_us"]
    check_numerics(db)


@pytest.mark.slow
def test_a_run_with_its_trials_in_the_database_measures_nothing(cluster, tuned, tmp_path):
    import contextlib
    import io
    import shutil

    db = tmp_path / "db"
    shutil.copytree(tuned[0], db)
    # a run killed while writing leaves a torn last line: it is dropped, the rest kept
    with (db / RECORDS).open("a") as f:
        f.write('[0, {"trace": [[')
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    row = tuned[1]["table"][0]
    ok = row["trials"] - row["failed"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "tune",
                str(spec),
                "-o",
                str(db),
                "--trials",
                str(ok),
                "--kernels",
                "tvm",
                "--rpc-tracker",
                cluster.address,
                "--rpc-key",
                KEY,
                "--builders",
                "2",
            ]
        )
    out = out.getvalue()
    assert code == 0, out
    assert records(db) == 4 and (db / RECORDS).read_text().endswith("\n")
    # the summary table: the task both tenants (and run_all) share, its trials, its best time
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("task "))
    assert lines[head].split() == ["task", "trials", "failed", "best", "us", "used", "by"]
    task, trials, failed, best, *users = lines[head + 1].replace(",", "").split()
    assert (task, trials, failed) == (row["task"], "4", str(row["failed"]))
    assert float(best) == pytest.approx(row["best_us"], abs=0.006)
    assert users == ["a", "b", "run_all"]
    assert "records: 4 in" in out and "(0 measured now, 4 before)" in out


def test_unreachable_tracker_fails_clearly_and_fast(tmp_path, capsys):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(
        TrackerError,
        match=rf"tracker 127\.0\.0\.1:{port}, key 'k': connecting "
        "failed: .*[Cc]onnection refused",
    ):
        tune(two_tenants(), "unused", rpc_tracker=f"127.0.0.1:{port}", rpc_key="k")
    assert time.monotonic() - t0 < 20
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    assert (
        main(
            [
                "tune",
                str(spec),
                "-o",
                str(tmp_path / "db"),
                "--rpc-tracker",
                "nohost",
                "--rpc-key",
                "k",
            ]
        )
        == 1
    )
    assert (
        "mtcompile: error: RPC tracker address 'nohost': expected HOST:PORT"
        in capsys.readouterr().err
    )
    with pytest.raises(TrackerError, match="a device key is needed"):
        Tracker.parse("127.0.0.1:9190", None)


@pytest.mark.slow
def test_a_key_no_server_offers_fails_clearly(cluster):
    with pytest.raises(
        TrackerError,
        match=rf"tracker {cluster.address}, key 'other': no server "
        r"with this key within 1 s \(start one: python -m tvm.exec.rpc_server",
    ):
        tune(two_tenants(), "unused", rpc_tracker=cluster.address, rpc_key="other", rpc_wait_s=1)


@pytest.mark.slow
def test_losing_every_server_stops_the_run_instead_of_failing_each_candidate(cluster):
    from tvm.s_tir import meta_schedule as ms

    from mtcompile.backend.tuning_remote import _session

    gone = Tracker("127.0.0.1", cluster.port, "gone")
    gone.lost(0)  # no failed run: nothing to check
    with pytest.raises(
        TrackerError,
        match=r"key 'gone': every server with this key is gone; "
        "the database keeps what was measured",
    ):
        gone.lost(1)
    Tracker("127.0.0.1", cluster.port, KEY).lost(1)  # a server is left: the run goes on
    # a session request for a key without servers fails at once (the tracker would queue it)
    t0 = time.monotonic()
    with pytest.raises(TrackerError, match="key 'gone': no server with this key is left"):
        _session(ms.runner.RPCConfig("127.0.0.1", cluster.port, "gone"))
    assert time.monotonic() - t0 < 20


def test_the_tuning_target_is_llvm_or_an_llvm_target_dict():
    from mtcompile.backend.tuning import parse_target

    assert parse_target('{"kind": "llvm", "mcpu": "skylake"}').attrs["mcpu"] == "skylake"
    assert parse_target({"kind": "llvm", "num-cores": 16}).attrs["num-cores"] == 16
    assert parse_target(None).kind.name == parse_target("llvm").kind.name == "llvm"
    with pytest.raises(mtcompile.MTCompileError, match="applied for target llvm only"):
        parse_target({"kind": "cuda"})
    with pytest.raises(mtcompile.MTCompileError, match="expected llvm or a TVM target dict"):
        parse_target("llvm -mcpu=skylake")


def test_gather_kernels_are_left_out_of_tuning():
    """MetaSchedule measures a kernel on random inputs: a gather's random indices read out of
    bounds (TVM's fast take) and kill the measuring process (an RPC server, found tuning the
    heterogeneous demo). Tasks that take an integer tensor are not tuned."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from mtcompile.backend.tuning import _reads_indices, fused_module

    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType((16,), "int64"))
    x = relax.Var("x", relax.TensorType((16, 64), "float32"))
    table = relax.const(np.ones((128, 64), np.float32))
    with bb.function("main", [ids, x]):
        with bb.dataflow():
            emb = bb.emit(relax.op.take(table, ids, axis=0))
            out = bb.emit_output(relax.op.add(relax.op.exp(x), emb))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    tasks = ms.relax_integration.extract_tasks(fused_module(bb.get(), target), target)
    flagged = {t.task_name: _reads_indices(t) for t in tasks}
    assert any(flagged.values()) and not all(flagged.values()), flagged
