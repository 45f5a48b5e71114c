"""Concurrent runtime core: each stream's Relax function runs on a thread of its own with a
VM of its own over one shared executable (a VM is not thread-safe), and waits at events.

Event points, emitted by lowering inside the stream functions:
``R.call_packed("mtcompile.streams.signal", <event id>)`` after the producer kernel and
``R.call_packed("mtcompile.streams.wait", <event id>)`` before the consumer. They find the
current run through a thread-local set by the stream thread. An error in one stream sets
an abort flag; waits poll it, so every other stream stops instead of waiting forever. A wait
past the run's deadline is a deadlock (a missing signal): it aborts every stream too, and
the run reports every stream left blocked with the event it waits for (`DeadlockError`),
the same whichever stream noticed first.

Threads: on CPU each stream thread gets ``threads // streams`` threads (at least 1; the
bundle's ``threads=``, see `mtcompile.runtime.threads`) for TVM's pool (one per calling thread
in TVM, sized from ``TVM_NUM_THREADS`` and capped by ``runtime.config_threadpool``) and for
PyTorch's kernels when the library provider runs (``torch.set_num_threads`` sets the calling
thread's OpenMP count: checked, other threads keep theirs), so streams don't oversubscribe
the cores. On CUDA
(UNTESTED: no GPU here) each stream thread runs on a raw stream of its own, and a signal
makes the waiting stream's device queue wait for the signalling one
(``Device_StreamSyncFromTo``) before the host-side event is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from mtcompile.abi import GET, PUT, SIGNAL, WAIT
from mtcompile.errors import MTCompileError
from mtcompile.runtime.cpu import usable_cores
from mtcompile.runtime.threads import run_marks

_local = threading.local()  # .run: the _Run this thread's stream belongs to, .stream: index
_registered = False


class StreamError(MTCompileError):
    """A stream failed: names the stream, its tenant(s) and the kernel (VM symbol)."""

    def __init__(self, stream: int, tenant: str, kernel: str | None, cause: BaseException):
        self.stream, self.tenant, self.kernel, self.cause = stream, tenant, kernel, cause
        where = f"kernel '{kernel}'" if kernel else "an unknown kernel (did not recur alone)"
        super().__init__(
            f"stream {stream} (tenant {tenant}) failed in {where}: {type(cause).__name__}: {cause}"
        )


class DeadlockError(StreamError):
    """Streams waited past the deadline: lists every blocked stream and the event it waits for."""

    def __init__(
        self,
        blocked: Mapping[int, int],
        labels: Sequence[str],
        event_streams: Sequence[tuple[int, int]] | None,
        timeout_s: float,
    ):
        self.blocked = dict(sorted(blocked.items()))
        first = next(iter(self.blocked))

        def source(e: int) -> str:
            return f"stream {event_streams[e][0]}" if event_streams else "an unknown stream"

        waits = "; ".join(
            f"stream {s} (tenant {labels[s]}) waits for event {e} (signalled by {source(e)})"
            for s, e in self.blocked.items()
        )
        MTCompileError.__init__(
            self, f"deadlock: no progress for {timeout_s} s; {waits}: a missing signal?"
        )
        self.stream, self.tenant, self.kernel = first, labels[first], WAIT
        self.cause = None


class _Run:
    """One call of `StreamExecutor.run`: its events, abort flag and deadline."""

    def __init__(self, ex: StreamExecutor, diagnose: bool = False, values=None):
        self.ex, self.diagnose = ex, diagnose
        self.values: dict[int, Any] = dict(values or {})  # value id -> tensor (put/get)
        self.events = [threading.Event() for _ in range(ex.num_events)]
        self.abort = threading.Event()
        self.aborted: set[int] = set()  # streams stopped because another one failed
        self.blocked: dict[int, int] = {}  # stream -> the event it waited for at the end
        self.deadlocked = False
        self.deadline = time.monotonic() + ex.timeout_s


def _current() -> _Run:
    run = getattr(_local, "run", None)
    if run is None:
        raise MTCompileError(f"{SIGNAL}/{WAIT} called outside a StreamExecutor run")
    return run


def _signal(event: int) -> None:
    run = _current()
    if run.diagnose:
        return
    run.ex._device_sync(event, _local.stream)
    run.events[int(event)].set()


def _wait(event: int) -> None:
    run = _current()
    if run.diagnose:  # a lone re-run to find the failing kernel: nothing to wait for
        return
    ev, poll = run.events[int(event)], run.ex.poll_s
    while not ev.wait(poll):
        if time.monotonic() > run.deadline and not run.abort.is_set():
            run.deadlocked = True  # the first time-out stops every stream
            run.abort.set()
        if run.abort.is_set():  # (TVM turns exception types into RuntimeError: record it)
            run.aborted.add(_local.stream)
            run.blocked[_local.stream] = int(event)
            raise RuntimeError(f"stream {_local.stream} stopped while waiting for event {event}")


def _put(value: int, tensor) -> None:
    _current().values[int(value)] = tensor


def _get(value: int):
    run = _current()
    try:
        return run.values[int(value)]
    except KeyError:
        raise RuntimeError(
            f"stream {_local.stream} reads value {value} before its producer "
            "handed it over: a missing event"
        ) from None


def register() -> None:
    """Register the event points as TVM global functions (idempotent)."""
    global _registered
    if not _registered:
        import tvm_ffi

        tvm_ffi.register_global_func(SIGNAL, _signal, override=True)
        tvm_ffi.register_global_func(WAIT, _wait, override=True)
        tvm_ffi.register_global_func(PUT, _put, override=True)
        tvm_ffi.register_global_func(GET, _get, override=True)
        _registered = True


class StreamExecutor:
    """Runs stream functions of one executable concurrently, one thread and VM each.

    functions: the VM function of each stream; num_events: event ids are 0..num_events-1;
    event_streams: (signalling stream, waiting stream) per event (needed on CUDA, names
    the signaller in timeouts); stream_tenants: a label per stream for errors;
    kernel_tenant: VM symbol -> tenant, to name a failing kernel's tenant; make_vm: builds
    a VM (default ``relax.VirtualMachine(executable, device)``), called on the stream's
    thread; threads_per_stream: CPU threads per stream (default cores // streams; a bundle
    passes its ``threads // streams``).
    One `run` at a time (a lock): stream threads and VMs are reused across runs.
    """

    def __init__(
        self,
        executable,
        device,
        functions: Sequence[str],
        num_events: int,
        *,
        event_streams: Sequence[tuple[int, int]] | None = None,
        stream_tenants: Sequence[str] | None = None,
        kernel_tenant: Mapping[str, str] | None = None,
        make_vm: Callable[[], Any] | None = None,
        threads_per_stream: int | None = None,
        timeout_s: float = 120.0,
        poll_s: float = 0.02,
        diagnose: bool = True,
    ):
        register()
        self.executable, self.device = executable, device
        self.functions, self.num_events = list(functions), int(num_events)
        self.event_streams = list(event_streams) if event_streams is not None else None
        self.stream_tenants = list(stream_tenants or ["?"] * len(self.functions))
        self.kernel_tenant = dict(kernel_tenant or {})
        self.make_vm = make_vm
        self.run_marks = run_marks()  # the native pool's workers spin while a stream runs
        n = len(self.functions)
        self.threads = threads_per_stream or max(1, usable_cores() // max(n, 1))
        self.timeout_s, self.poll_s, self.diagnose = timeout_s, poll_s, diagnose
        self.cuda = getattr(device, "dlpack_device_type", lambda: 1)() == 2
        self._raw: list[Any] = [None] * n  # raw CUDA stream per stream
        self._vms: list[Any] = [None] * n  # touched only by the stream's own thread
        self._pools = [
            ThreadPoolExecutor(1, thread_name_prefix=f"mtcompile-stream{i}") for i in range(n)
        ]
        self._lock = threading.Lock()

    # -- on the stream's thread
    def _setup(self, i: int):
        if self._vms[i] is None:
            if self.cuda:  # UNTESTED on a GPU
                self._raw[i] = self.device.create_raw_stream()
                self.device.set_raw_stream(self._raw[i])
            else:
                self._limit_cpu_threads()
            if self.make_vm is not None:
                self._vms[i] = self.make_vm()
            else:
                from tvm import relax

                self._vms[i] = relax.VirtualMachine(self.executable, self.device)
        return self._vms[i]

    def _limit_cpu_threads(self) -> None:
        from mtcompile.runtime.threads import limit_pool, set_torch_threads

        set_torch_threads(self.threads)  # library kernels: this thread's OpenMP/MKL count
        limit_pool(self.threads)

    def _device_sync(self, event: int, stream: int) -> None:
        if self.cuda and self.event_streams:  # UNTESTED on a GPU
            import tvm_ffi

            dst = self.event_streams[event][1]
            tvm_ffi.get_global_func("runtime.Device_StreamSyncFromTo")(
                self.device, self._raw[stream], self._raw[dst]
            )

    def _run_stream(self, i: int, run: _Run, args: Sequence, instrument=None):
        vm = self._setup(i)
        _local.run, _local.stream = run, i
        if instrument is not None:
            vm.set_instrument(instrument)
        marks = self.run_marks
        if marks is not None:
            marks[0]()
        try:
            return vm[self.functions[i]](*args)
        finally:
            if marks is not None:
                marks[1]()
            _local.run = None
            if instrument is not None:
                vm.set_instrument(None)

    # -- on the caller's thread
    def run(self, args: Sequence[Sequence]) -> list:
        """Run every stream with its arguments; returns each stream function's result.
        Raises `StreamError` naming the first stream that failed (others are stopped)."""
        if len(args) != len(self.functions):
            raise MTCompileError(f"{len(args)} argument lists for {len(self.functions)} streams")
        with self._lock:
            run = _Run(self)
            futures = [
                p.submit(self._run_stream, i, run, a)
                for i, (p, a) in enumerate(zip(self._pools, args, strict=True))
            ]
            wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.done() and f.exception() is not None for f in futures):
                run.abort.set()  # wake every waiter: they stop within poll_s
            wait(futures)
            failed = [
                (i, f.exception())
                for i, f in enumerate(futures)
                if f.exception() is not None and i not in run.aborted
            ]
            if failed:
                i, exc = failed[0]
                kernel = self._locate(i, args[i], run.values) if self.diagnose else None
                tenant = self.kernel_tenant.get(kernel or "", self.stream_tenants[i])
                raise StreamError(i, tenant, kernel, exc) from exc
            if run.deadlocked:
                raise DeadlockError(
                    run.blocked, self.stream_tenants, self.event_streams, self.timeout_s
                )
            return [f.result() for f in futures]

    def _locate(self, i: int, args: Sequence, values=None) -> str | None:
        """The VM symbol that raises when stream `i` runs again alone (waits skipped; the
        values other streams handed over in the failed run are fetched again)."""
        open_calls: list[str] = []

        def instrument(func, symbol, before, ret, *rest):
            if before:
                open_calls.append(str(symbol))
            elif open_calls:
                open_calls.pop()
            return 0

        try:
            self._pools[i].submit(
                self._run_stream, i, _Run(self, True, values), args, instrument
            ).result()
        except Exception:
            return next(
                (
                    s
                    for s in reversed(open_calls)
                    if not s.startswith("vm.builtin") and not s.startswith("mtcompile.streams.")
                ),
                open_calls[-1] if open_calls else None,
            )
        return None

    def close(self) -> None:
        """Stop the stream threads (their VMs go with them)."""
        for p in self._pools:
            p.shutdown(wait=True)
