"""Concurrent run_all: a thin binding over the runtime core's stream executor
(`mtcompile/core/src/executor.h`, `streams.h`), which ``mtcompile-run`` runs too.

In the core, each stream's Relax function runs on a persistent thread of its own with a VM of
its own over one shared executable (a VM is not thread-safe), made on that thread. Event
points, emitted by lowering inside the stream functions (``R.call_packed(SIGNAL/WAIT/PUT/GET,
...)``, names in `mtcompile.abi`), are C++ global functions that find the current run through a
thread-local: a wait blocks on a condition variable until its event is signalled. An error in
one stream aborts the run: every waiting stream wakes and stops. A wait past the run's deadline
is a deadlock (a missing signal): it aborts every stream too, and the run reports every stream
left blocked with the event it waits for (`DeadlockError`), the same whichever stream noticed
first. A failing stream is named with its kernel: the core runs it again alone (waits skipped)
under a VM instrument and names the innermost call that raised (`StreamError`). A run's failure
goes to its caller only: runs are serialized, and after a failed run the same stream threads
make fresh VMs (which look the kernels up anew) for the next one.

Threads: on CPU each stream thread limits its pool to ``threads // streams`` threads (at
least 1; the bundle's ``threads=``, see `mtcompile.runtime.threads`), in the core; the hook
this module gives the core sets PyTorch's count on that thread too (``torch.set_num_threads``
is per calling thread: checked, other threads keep theirs) for the library provider's kernels,
which the core calls on its threads through tvm-ffi (it takes the GIL). On CUDA (UNTESTED: no
GPU here) the hooks give each stream thread a raw stream of its own, and a signal makes the
waiting stream's device queue wait for the signalling one (``Device_StreamSyncFromTo``) before
the host-side event is set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import partial

from mtcompile.abi import GET, PUT, SIGNAL, WAIT
from mtcompile.errors import MTCompileError
from mtcompile.runtime.cpu import usable_cores

__all__ = ["GET", "PUT", "SIGNAL", "WAIT", "DeadlockError", "StreamError", "StreamExecutor"]


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


def _ffi():
    from mtcompile.runtime import tvmrt

    return tvmrt.ffi()


def register() -> None:
    """Load the runtime core, which registers the event points as global functions."""
    from mtcompile import core

    core.load(_ffi())


def _module(executable):
    """The executable as the module the core makes VMs from (a compiled one: its library)."""
    return executable if isinstance(executable, _ffi().Module) else executable.jit()


# Hooks the core calls on a stream's thread. They hold no reference to the StreamExecutor (the
# core holds them): dropping it closes the core's executor, whose threads end with it.
def _on_start(threads: int, cuda_device, raw: list, i: int) -> None:
    if cuda_device is not None:  # UNTESTED on a GPU
        raw[i] = cuda_device.create_raw_stream()
        cuda_device.set_raw_stream(raw[i])
        return
    from mtcompile.runtime.threads import set_torch_threads

    set_torch_threads(threads)  # library kernels: this thread's OpenMP/MKL count


def _on_signal(device, raw: list, event_streams, event: int, stream: int) -> None:
    dst = event_streams[event][1]  # UNTESTED on a GPU
    _ffi().get_global_func("runtime.Device_StreamSyncFromTo")(device, raw[stream], raw[dst])


class StreamExecutor:
    """Runs stream functions of one executable concurrently, one thread and VM each (the
    runtime core's executor).

    functions: the VM function of each stream; num_events: event ids are 0..num_events-1;
    event_streams: (signalling stream, waiting stream) per event (needed on CUDA, names
    the signaller in timeouts); stream_tenants: a label per stream for errors;
    kernel_tenant: VM symbol -> tenant, to name a failing kernel's tenant;
    threads_per_stream: CPU threads per stream (default cores // streams; a bundle passes
    its ``threads // streams``); diagnose: name the failing kernel (a lone re-run).
    One `run` at a time (the core serializes them): stream threads are reused across runs, a
    failed one included; VMs too, but after a failed run (fresh ones then).
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
        threads_per_stream: int | None = None,
        timeout_s: float = 120.0,
        diagnose: bool = True,
    ):
        register()
        self.device, self.functions = device, list(functions)
        self.num_events = int(num_events)
        self.event_streams = list(event_streams) if event_streams is not None else None
        n = len(self.functions)
        self.stream_tenants = list(stream_tenants or ["?"] * n)
        self.kernel_tenant = dict(kernel_tenant or {})
        self.threads = threads_per_stream or max(1, usable_cores() // max(n, 1))
        self.timeout_s, self.diagnose = timeout_s, diagnose
        self.cuda = device.dlpack_device_type() == 2
        self._raw: list = [None] * n  # raw CUDA stream per stream
        record = {
            "functions": self.functions,
            "num_events": self.num_events,
            "event_streams": [list(p) for p in self.event_streams or []],
            "stream_tenants": self.stream_tenants,
            "kernel_tenant": self.kernel_tenant,
        }
        make = _ffi().get_global_func("mtcompile.core.stream_executor")
        self._run, self._close = make(
            _module(executable),
            json.dumps(record),
            device.dlpack_device_type(),
            device.index,
            self.threads,
            float(timeout_s),
            diagnose,
            partial(_on_start, self.threads, device if self.cuda else None, self._raw),
            partial(_on_signal, device, self._raw, self.event_streams)
            if self.cuda and self.event_streams
            else None,
        )

    # -- on the caller's thread
    def run(self, args: Sequence[Sequence]) -> list:
        """Run every stream with its arguments; returns each stream function's result.
        Raises `StreamError` naming the first stream that failed (others are stopped), or
        `DeadlockError`."""
        if len(args) != len(self.functions):
            raise MTCompileError(f"{len(args)} argument lists for {len(self.functions)} streams")
        kind, *rest = self._run([list(a) for a in args])
        if not kind:
            return rest
        if kind == "failed":
            stream, tenant, kernel, cause = rest
            exc = cause.py_error() if hasattr(cause, "py_error") else RuntimeError(str(cause))
            raise StreamError(int(stream), str(tenant), str(kernel) or None, exc) from exc
        blocked = {int(s): int(e) for s, e in zip(rest[2::2], rest[3::2], strict=True)}
        raise DeadlockError(blocked, self.stream_tenants, self.event_streams, self.timeout_s)

    def close(self) -> None:
        """Stop the stream threads (their VMs go with them); idempotent."""
        close, self._close = self._close, None
        if close is not None:
            close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: the threads end with it)
            pass
