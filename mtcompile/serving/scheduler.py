"""Requests of each tenant, arriving on their own -> per-tenant queues -> one loop thread
that takes what is pending within a window, stacks each tenant's requests along its batch
dim and makes one bundle call per window -> outputs split back to each request's future."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from mtcompile.errors import InputError, QueueFullError, SchedulerClosedError
from mtcompile.runtime.inputs import check_inputs
from mtcompile.serving import batching
from mtcompile.serving.metrics import TenantMetrics

RUN_ALL, RUN_SOME, RUN, RETRY = "run_all", "run_some", "run", "retry"  # kinds of bundle call


@dataclass
class _Request:
    tenant: str
    arrays: list[np.ndarray]
    rows: int
    key: tuple  # requests of one key stack (`batching.stack_key`)
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


class Scheduler:
    """Serves a bundle to requests that arrive one by one, per tenant.

    ``submit(tenant, *inputs)`` checks the inputs as ``Bundle.run`` does and returns a
    ``concurrent.futures.Future`` of the tenant's outputs (a list of numpy arrays), or
    raises (`InputError`, `QueueFullError`, `SchedulerClosedError`): a request that got a
    future is accepted and will be completed. One loop thread waits `max_delay_ms` after
    the oldest pending request, then takes per tenant what one call serves: a tenant with
    a dynamic batch dim (`batching.batch_dim`) stacks its requests up to the dim's bound,
    another takes one request; the rest wait for the next window. `max_queue`: requests
    each tenant may have waiting. `no_stack`: tenants not to stack (their dim holds rows
    that are not independent samples). `start=False`: accept requests, serve from `start()`.
    """

    def __init__(
        self,
        bundle,
        max_delay_ms: float = 2.0,
        max_queue: int = 256,
        *,
        no_stack: Iterable[str] = (),
        start: bool = True,
    ):
        if max_queue < 1 or max_delay_ms < 0:
            raise ValueError(
                f"max_queue must be >= 1 and max_delay_ms >= 0, got {max_queue} and {max_delay_ms}"
            )
        m = bundle.manifest
        self.bundle, self.max_queue, self.max_delay = bundle, max_queue, max_delay_ms / 1e3
        self._order = tuple(m.tenant_order)
        self._sigs = dict(m.tenants)
        no_stack = set(no_stack)
        unknown = sorted(no_stack - set(self._order))
        if unknown:
            raise InputError(
                f"no_stack names unknown tenants {unknown}; this bundle has {list(self._order)}"
            )
        self._dims = {
            t: None if t in no_stack else batching.batch_dim(self._sigs[t]) for t in self._order
        }
        self._shared = [g for g in m.run_all_inputs if len(g) > 1]  # run_all reads once
        self._subsets = {s.tenants for s in getattr(m, "subsets", {}).values()}
        self._queues: dict[str, deque[_Request]] = {t: deque() for t in self._order}
        self._metrics = {t: TenantMetrics() for t in self._order}
        self._bundle_calls: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ the public side
    def start(self) -> None:
        """Start the loop thread (a scheduler made with ``start=False``); idempotent."""
        with self._cond:
            if self._closing:
                raise SchedulerClosedError("the scheduler is closed: it cannot start again")
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="mtcompile-scheduler", daemon=True
            )
            self._thread.start()

    def batch_dim(self, tenant: str) -> batching.BatchDim | None:
        """The dim `tenant`'s requests stack along (None: one request per call)."""
        return self._dims[tenant]

    def submit(self, tenant: str, *inputs) -> Future:
        """Queue one request of `tenant`; its future gives the outputs, or the exception
        of its own call. Raises at once, and queues nothing, for an unknown tenant, inputs
        that do not match the signature, a full queue or a closed scheduler."""
        sig = self._sigs.get(tenant)
        if sig is None:
            raise InputError(f"unknown tenant {tenant!r}; this bundle serves {list(self._order)}")
        metrics = self._metrics[tenant]
        try:
            # copies: the caller may reuse its buffers once submit returns
            arrays = [np.array(a) for a in check_inputs(tenant, sig, inputs)]
        except InputError:
            metrics.count("failed")
            raise
        bd = self._dims[tenant]
        req = _Request(tenant, arrays, batching.rows(arrays, bd), batching.stack_key(arrays, bd))
        with self._cond:
            if self._closing:
                metrics.count("rejected")
                raise SchedulerClosedError(
                    f"tenant '{tenant}': the scheduler is closed and "
                    "accepts no request; submit to a new Scheduler"
                )
            if len(self._queues[tenant]) >= self.max_queue:
                metrics.count("rejected")
                raise QueueFullError(tenant, self.max_queue)
            self._queues[tenant].append(req)
            self._cond.notify_all()
        return req.future

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests. `drain`: serve every accepted request first; else fail
        those still waiting with `SchedulerClosedError` (a call under way completes).
        Returns when the loop has ended (or after `timeout` seconds)."""
        with self._cond:
            self._closing = True
            dropped = [] if drain else [r for q in self._queues.values() for r in q]
            if not drain:
                for q in self._queues.values():
                    q.clear()
            if any(self._queues.values()):
                self._start_locked()  # never started: it still serves what it accepted
            self._cond.notify_all()
            thread = self._thread
        for r in dropped:
            self._fail(
                r,
                SchedulerClosedError(
                    f"tenant '{r.tenant}': the request was not run: the scheduler was closed "
                    "with drain=False"
                ),
            )
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=True)

    def metrics(self) -> dict:
        """``{"tenants": {name: {queue_depth, done, failed, rejected, batch_sizes (requests
        per call -> calls), batch_rows, calls (kind -> calls), latency_ms (p50, p90, p99 of
        submit to result)}}, "calls": {kind: bundle calls}}``. `failed`: requests whose
        call raised, dropped by ``close(drain=False)`` or refused at submit for their
        inputs; `rejected`: refused for a full queue or a closed scheduler."""
        with self._cond:
            depth = {t: len(q) for t, q in self._queues.items()}
            calls = dict(sorted(self._bundle_calls.items()))
        return {
            "tenants": {t: self._metrics[t].snapshot(depth[t]) for t in self._order},
            "calls": calls,
        }

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while (batches := self._take()) is not None:
            try:
                self._serve(batches)
            except BaseException as e:  # a bug of ours: no accepted request is left hanging
                for reqs in batches.values():
                    for r in reqs:
                        self._fail(r, e)
                if not isinstance(e, Exception):
                    raise

    def _take(self) -> dict[str, list[_Request]] | None:
        """Wait for a window's requests and take them (None: closed and nothing left)."""
        with self._cond:
            while not any(self._queues.values()):
                if self._closing:
                    return None
                self._cond.wait()
            oldest = min(q[0].submitted for q in self._queues.values() if q)
            while not self._closing and not self._all_full():
                left = oldest + self.max_delay - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken = {t: self._pop(t) for t in self._order if self._queues[t]}
        return {t: reqs for t, reqs in taken.items() if reqs}

    def _all_full(self) -> bool:
        """Every tenant has a full call waiting: a longer wait cannot add to this window."""
        for t, q in self._queues.items():
            bd = self._dims[t]
            need = 1 if bd is None else bd.bound
            if sum(r.rows for r in q) < need:  # bounded by max_queue
                return False
        return True

    def _pop(self, tenant: str) -> list[_Request]:
        """A tenant's requests for one call: the oldest, and after it (a stacking tenant)
        those that stack with it, in order, while the rows stay within the bound."""
        q, bd = self._queues[tenant], self._dims[tenant]
        taken: list[_Request] = []
        while q and (
            not taken
            or (
                bd is not None
                and q[0].key == taken[0].key
                and sum(r.rows for r in taken) + q[0].rows <= bd.bound
            )
        ):
            r = q.popleft()
            if r.future.set_running_or_notify_cancel():  # False: cancelled while waiting
                taken.append(r)
        return taken

    # ------------------------------------------------------------------ the calls
    def _serve(self, batches: dict[str, list[_Request]]) -> None:
        stacked = {
            t: batching.stack([r.arrays for r in reqs], self._dims[t])
            for t, reqs in batches.items()
        }
        for kind, tenants in self._plan(stacked):
            if kind in (RUN_ALL, RUN_SOME):
                self._run_merged(kind, batches, stacked)
            else:
                for t in tenants:
                    self._run_entry(t, batches[t], stacked[t], RUN)

    def _plan(self, stacked: dict[str, list[np.ndarray]]) -> list[tuple[str, tuple[str, ...]]]:
        """The bundle calls that serve one window, as ``(kind, tenants)``: ``run_all`` when
        every tenant has work, ``run_some`` when the bundle has a merged function for
        exactly the tenants that have work (in both, tenants that share an input got one
        value for it), else each present tenant's own entry."""
        present = tuple(t for t in self._order if t in stacked)
        if (present == self._order or present in self._subsets) and self._shared_agree(stacked):
            return [(RUN_ALL if present == self._order else RUN_SOME, present)]
        return [(RUN, (t,)) for t in present]

    def _shared_agree(self, stacked: dict[str, list[np.ndarray]]) -> bool:
        def value(tenant: str, name: str) -> np.ndarray:
            names = [s.name for s in self._sigs[tenant].inputs]
            return stacked[tenant][names.index(name)]

        groups = [[u for u in g if u[0] in stacked] for g in self._shared]
        return all(
            value(*g[0]).shape == value(*u).shape and np.array_equal(value(*g[0]), value(*u))
            for g in groups
            for u in g[1:]
        )

    def _run_merged(
        self, kind: str, batches: dict[str, list[_Request]], stacked: dict[str, list[np.ndarray]]
    ) -> None:
        """One ``run_all`` or ``run_some`` call; if it raises, each tenant's entry serves
        its requests (so that only the request at fault fails)."""
        self._count_call(kind)
        for t, reqs in batches.items():
            self._metrics[t].call(kind, len(reqs), sum(r.rows for r in reqs))
        try:
            outs = (
                self.bundle.run_all(stacked) if kind == RUN_ALL else self.bundle.run_some(stacked)
            )
        except Exception:
            for t, reqs in batches.items():
                self._run_entry(t, reqs, stacked[t], RUN)
            return
        for t, reqs in batches.items():
            self._deliver(t, reqs, outs[t])

    def _run_entry(
        self, tenant: str, reqs: list[_Request], arrays: list[np.ndarray], kind: str
    ) -> None:
        """One call of the tenant's entry; if a stacked call raises, each request is
        retried alone, so that the request at fault alone gets the exception."""
        self._count_call(kind)
        self._metrics[tenant].call(kind, len(reqs), sum(r.rows for r in reqs))
        try:
            outs = self.bundle.run(tenant, *arrays)
        except Exception as e:
            if len(reqs) == 1:
                self._fail(reqs[0], e)
            else:
                for r in reqs:
                    self._run_entry(tenant, [r], r.arrays, RETRY)
            return
        self._deliver(tenant, reqs, outs)

    def _count_call(self, kind: str) -> None:
        with self._cond:  # metrics() reads the counter from another thread
            self._bundle_calls[kind] += 1

    def _deliver(self, tenant: str, reqs: list[_Request], outs: list[np.ndarray]) -> None:
        parts = batching.split(list(outs), [r.rows for r in reqs], self._dims[tenant])
        now = time.perf_counter()
        for r, p in zip(reqs, parts, strict=True):
            self._metrics[tenant].finished(True, now - r.submitted)  # before the future:
            r.future.set_result(p)  # a caller that waits on it then sees the counts

    def _fail(self, r: _Request, e: BaseException) -> None:
        if r.future.done():
            return
        self._metrics[r.tenant].finished(False, time.perf_counter() - r.submitted)
        r.future.set_exception(e)
