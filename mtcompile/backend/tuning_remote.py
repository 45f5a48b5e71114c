"""Measuring tuning candidates on an RPC tracker's devices: checks, runner, failure handling.

TVM's tracker hands out RPC servers by key; MetaSchedule's `RPCRunner` asks it for one
session per candidate. What TVM leaves open is handled here: an unreachable tracker or a key
no server offers fails at once with a clear error (the tracker would queue the request
forever), each measurement is bounded in time (a lost server costs its in-flight candidates,
not the run), and a run whose servers are all gone stops instead of failing every candidate.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from mtcompile.errors import MTCompileError


class TrackerError(MTCompileError):
    """The RPC tracker cannot be reached, or offers no server with the key."""


@dataclass(frozen=True)
class Devices:
    """A checked tracker: the servers with its key when checked, and one's thread count."""

    tracker: Tracker
    servers: int
    threads: int


@dataclass(frozen=True)
class Tracker:
    """Where candidates are measured: the tracker's address and the devices' key."""

    host: str
    port: int
    key: str
    # how long to wait for the tracker, for a server with the key to be listed, and (beyond
    # the session itself) for a free server before a candidate counts as failed
    wait_s: float = 30.0
    # the longest one measurement may hold a server (upload, run, clean up)
    session_timeout_s: int = 60

    @classmethod
    def parse(cls, address: str, key: str | None, **kw) -> Tracker:
        """From ``"HOST:PORT"`` and a key (both checked)."""
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TrackerError(f"RPC tracker address {address!r}: expected HOST:PORT")
        if not key:
            raise TrackerError(f"RPC tracker {address}: a device key is needed (--rpc-key)")
        return cls(host, int(port), key, **kw)

    @property
    def where(self) -> str:
        return f"tracker {self.host}:{self.port}, key {self.key!r}"

    def _with_timeout(self, fn, what: str):
        """fn() in a thread; TrackerError if it raises or takes over `wait_s`."""
        box: dict = {}

        def call():
            try:
                box["value"] = fn()
            except Exception as e:  # noqa: BLE001 - reported below with the tracker's address
                box["error"] = e

        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(self.wait_s)
        if t.is_alive():
            raise TrackerError(f"{self.where}: no answer to {what} within {self.wait_s:.0f} s")
        if "error" in box:
            raise TrackerError(f"{self.where}: {what} failed: {box['error']}") from box["error"]
        return box["value"]

    def _connect(self):
        from tvm import rpc

        def connect():
            # rpc.connect_tracker retries a refused connection for 60 s, logging each try:
            # one plain try first, so that a wrong address fails at once
            socket.create_connection((self.host, self.port), timeout=self.wait_s).close()
            return rpc.connect_tracker(self.host, self.port)

        return self._with_timeout(connect, "connecting")

    def servers(self) -> int:
        """How many servers with the key the tracker lists (TrackerError if unreachable)."""
        tracker = self._connect()
        try:
            summary = self._with_timeout(tracker.summary, "a summary request")
        finally:
            tracker.close()
        return sum(1 for s in summary["server_info"] if s["key"].split(":")[-1] == self.key)

    def check(self) -> Devices:
        """Wait (up to `wait_s`) for a server with the key; return what the tracker offers.

        A session is opened once to read the device's thread count (MetaSchedule sizes
        parallel loops by it) and to prove that servers accept sessions; a server lost
        during it is replaced by the next one.
        """
        deadline = time.monotonic() + self.wait_s
        lost = None
        while True:
            if n := self.servers():
                try:
                    return Devices(self, n, self._threads())
                except TrackerError as e:
                    lost = e
            if time.monotonic() > deadline:
                if lost is not None:
                    raise lost
                raise TrackerError(
                    f"{self.where}: no server with this key within {self.wait_s:.0f} s (start "
                    f"one: python -m tvm.exec.rpc_server --tracker {self.host}:{self.port} "
                    f"--key {self.key}; list them: python -m tvm.exec.query_rpc_tracker "
                    f"--host {self.host} --port {self.port})"
                )
            time.sleep(0.5)

    def _threads(self) -> int:
        """The TVM thread count of a server with the key, read in a session of its own."""
        tracker = self._connect()

        def ask() -> int:
            session = tracker.request(self.key, session_timeout=self.session_timeout_s)
            return int(session.get_function("runtime.NumThreads")())

        try:
            return self._with_timeout(ask, "a session request")
        finally:
            tracker.close()

    def runner(self, workers: int):
        """An `RPCRunner` with `workers` connections whose measurements are bounded in time."""
        from tvm.s_tir import meta_schedule as ms
        from tvm.support.popen_pool import PopenPoolExecutor

        config = ms.runner.RPCConfig(
            tracker_host=self.host,
            tracker_port=self.port,
            tracker_key=self.key,
            session_timeout_sec=self.session_timeout_s,
        )
        runner = ms.runner.RPCRunner(config, max_workers=workers, f_create_session=_session)
        # RPCRunner's pool has no timeout: a request for a server that never comes back
        # would block the run forever. With one, the worker is killed and the candidate
        # comes back as a failed run (RPCRunnerFuture turns TimeoutError into an error
        # result). Set on the pool it made: its workers are started (and TVM imported).
        if not isinstance(runner.pool, PopenPoolExecutor) or not hasattr(runner.pool, "_timeout"):
            raise MTCompileError(
                "this TVM's RPCRunner has no PopenPoolExecutor pool: cannot "
                "bound its measurements in time"
            )
        runner.pool._timeout = self.session_timeout_s + self.wait_s
        return runner

    def lost(self, failed: int) -> None:
        """After a batch with `failed` failed runs: raise when no server is left (later
        batches could not be measured; a session request would wait for one forever)."""
        if failed and self.servers() == 0:
            raise TrackerError(
                f"{self.where}: every server with this key is gone; the database keeps what "
                "was measured: start a server and run the same command again to continue"
            )


def _session(config):
    """RPCRunner's session factory (run in its workers): fails at once when the tracker
    lists no server with the key, where the tracker would queue the request until one
    registers (servers in a session stay listed: only lost ones leave)."""
    tracker = Tracker(
        config.tracker_host,
        int(config.tracker_port),
        config.tracker_key,
        session_timeout_s=config.session_timeout_sec,
    )
    if tracker.servers() == 0:
        raise TrackerError(f"{tracker.where}: no server with this key is left")
    return config.connect_server()
