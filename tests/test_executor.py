"""The stream executor on real TVM VMs: tiny Relax modules whose stream functions hand
tensors to each other through shared buffers at event points; errors and timeouts."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

from mtcompile.errors import MTCompileError
from mtcompile.runtime.executor import SIGNAL, WAIT, DeadlockError, StreamError, StreamExecutor

SEEN: dict[str, object] = {}


@tvm_ffi.register_global_func("test.streams.store", override=True)
def _store(src, dst):
    # slow producer: a missing wait would let the consumer read the old buffer
    time.sleep(0.002)
    torch.from_dlpack(dst).copy_(torch.from_dlpack(src))
    # the core's stream threads are named mtc-stream<i> (the kernel's name of the thread)
    comm = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()
    SEEN.setdefault("threads", set()).add(comm)


@tvm_ffi.register_global_func("test.streams.boom", override=True)
def _boom(a, out):
    raise ValueError("injected kernel failure")


@tvm_ffi.register_global_func("test.streams.threads", override=True)
def _threads():
    SEEN["torch_threads"] = torch.get_num_threads()


T4 = relax.TensorType((4,), "float32")
NONE = relax.TupleType([])


def _call(bb, name, *args):
    bb.emit(relax.Call(relax.ExternFunc(name), list(args), ty_args=[NONE]))


def _point(bb, name, event):
    _call(bb, name, relax.prim_value(event))


def ping_pong(boom: bool = False, never_signal: bool = False) -> tvm.IRModule:
    """s0: a = x + 1 -> buf0, signal 0, wait 1, return buf1 * 2.
    s1: wait 0, b = buf0 * 3 -> buf1, signal 1, return b + 1."""
    bb = relax.BlockBuilder()
    x, b0, b1 = (relax.Var(n, T4) for n in ("x", "buf0", "buf1"))
    with bb.function("s0", [x, b0, b1]):
        _call(bb, "test.streams.threads")
        a = bb.emit(relax.op.add(x, relax.const(1.0)))
        if boom:
            a = bb.emit(relax.op.call_dps_packed("test.streams.boom", relax.Tuple([a]), T4))
        _call(bb, "test.streams.store", a, b0)
        if not never_signal:
            _point(bb, SIGNAL, 0)
        _point(bb, WAIT, 1)
        bb.emit_func_output(bb.emit(relax.op.multiply(b1, relax.const(2.0))))
    x, b0, b1 = (relax.Var(n, T4) for n in ("x", "buf0", "buf1"))
    with bb.function("s1", [x, b0, b1]):
        _point(bb, WAIT, 0)
        b = bb.emit(relax.op.multiply(b0, relax.const(3.0)))
        _call(bb, "test.streams.store", b, b1)
        _point(bb, SIGNAL, 1)
        bb.emit_func_output(bb.emit(relax.op.add(b, relax.const(1.0))))
    return bb.get()


@pytest.fixture(scope="module")
def built():
    return tvm.compile(ping_pong(), "llvm")


def _args(x):
    bufs = [tvm.runtime.tensor(np.zeros(4, "float32")) for _ in range(2)]
    xt = tvm.runtime.tensor(x)
    return [[xt, *bufs], [xt, *bufs]]


def test_streams_hand_tensors_over_at_events_over_many_runs(built):
    ex = StreamExecutor(
        built, tvm.cpu(), ["s0", "s1"], 2, event_streams=[(0, 1), (1, 0)], stream_tenants=["a", "b"]
    )
    rng = np.random.default_rng(0)
    try:
        for _ in range(40):
            x = rng.standard_normal(4).astype("float32")
            out0, out1 = ex.run(_args(x))
            np.testing.assert_allclose(out1.numpy(), (x + 1) * 3 + 1, rtol=1e-6)
            np.testing.assert_allclose(out0.numpy(), (x + 1) * 6, rtol=1e-6)
    finally:
        ex.close()
    assert {"mtc-stream0", "mtc-stream1"} <= SEEN["threads"]


def test_cpu_threads_are_split_among_streams(built):
    ex = StreamExecutor(built, tvm.cpu(), ["s0", "s1"], 2, threads_per_stream=1)
    before = torch.get_num_threads()
    try:
        ex.run(_args(np.ones(4, "float32")))
    finally:
        ex.close()
    assert SEEN["torch_threads"] == 1  # the stream thread's own count...
    assert torch.get_num_threads() == before  # ...not the caller's


@pytest.mark.slow  # builds a module of its own
def test_injected_kernel_error_names_stream_tenant_kernel_without_hanging():
    ex = StreamExecutor(
        tvm.compile(ping_pong(boom=True), "llvm"),
        tvm.cpu(),
        ["s0", "s1"],
        2,
        event_streams=[(0, 1), (1, 0)],
        stream_tenants=["vision", "text"],
        kernel_tenant={"test.streams.boom": "vision"},
        timeout_s=60,
    )
    t0 = time.monotonic()
    with pytest.raises(
        StreamError,
        match=r"stream 0 \(tenant vision\) failed in kernel "
        r"'test.streams.boom'.*injected kernel failure",
    ) as e:
        ex.run(_args(np.ones(4, "float32")))
    assert time.monotonic() - t0 < 10  # stream 1 was woken, not left waiting for event 0
    assert e.value.stream == 0 and e.value.kernel == "test.streams.boom"
    # the executor still works afterwards: the failed run left no thread stuck
    with pytest.raises(StreamError):
        ex.run(_args(np.ones(4, "float32")))
    ex.close()


@pytest.mark.slow  # builds a module of its own
def test_missing_signal_is_reported_as_a_deadlock_listing_every_blocked_stream():
    # Both streams wait for a signal that never comes. Whichever times out first aborts the
    # other; the error is the same either way: every blocked stream with its event.
    ex = StreamExecutor(
        tvm.compile(ping_pong(never_signal=True), "llvm"),
        tvm.cpu(),
        ["s0", "s1"],
        2,
        event_streams=[(0, 1), (1, 0)],
        stream_tenants=["a", "b"],
        timeout_s=0.5,
    )
    t0 = time.monotonic()
    with pytest.raises(DeadlockError) as e:
        ex.run(_args(np.ones(4, "float32")))
    assert time.monotonic() - t0 < 5  # one time-out stopped both streams
    assert e.value.blocked == {0: 1, 1: 0}
    assert str(e.value) == (
        "deadlock: no progress for 0.5 s; stream 0 (tenant a) waits for event 1 (signalled by "
        "stream 1); stream 1 (tenant b) waits for event 0 (signalled by stream 0): a missing "
        "signal?"
    )
    assert isinstance(e.value, StreamError) and e.value.kernel == WAIT
    ex.close()


def test_event_points_outside_an_executor_run_fail_clearly(built):
    vm = relax.VirtualMachine(built, tvm.cpu())
    with pytest.raises(Exception, match="outside a StreamExecutor run"):
        vm["s1"](*_args(np.ones(4, "float32"))[1])


def test_argument_lists_must_match_streams(built):
    ex = StreamExecutor(built, tvm.cpu(), ["s0", "s1"], 2)
    with pytest.raises(MTCompileError, match="1 argument lists for 2 streams"):
        ex.run([[]])
    ex.close()


@pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA device: GPU streams untested here")
def test_cuda_streams_raw_stream_per_thread():  # pragma: no cover - needs a GPU
    from tvm.s_tir import dlight as dl

    mod = ping_pong()
    with tvm.target.Target("cuda"):
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(relax.transform.LegalizeOps()(mod))
    dev = tvm.cuda(0)
    ex = StreamExecutor(
        tvm.compile(mod, "cuda"), dev, ["s0", "s1"], 2, event_streams=[(0, 1), (1, 0)]
    )
    x = np.arange(4, dtype="float32")
    bufs = [tvm.runtime.tensor(np.zeros(4, "float32"), dev) for _ in range(2)]
    xt = tvm.runtime.tensor(x, dev)
    out0, out1 = ex.run([[xt, *bufs], [xt, *bufs]])
    np.testing.assert_allclose(out1.numpy(), (x + 1) * 3 + 1)
    ex.close()


def _stream_threads() -> int:
    return sum(
        (p / "comm").read_text().startswith("mtc-stream") for p in Path("/proc/self/task").iterdir()
    )


def test_a_dropped_executor_ends_its_stream_threads(built):
    before = _stream_threads()
    ex = StreamExecutor(built, tvm.cpu(), ["s0", "s1"], 2, event_streams=[(0, 1), (1, 0)])
    out0, _ = ex.run(_args(np.ones(4, "float32")))
    np.testing.assert_allclose(out0.numpy(), np.full(4, 12.0, "float32"))
    assert _stream_threads() == before + 2
    del ex, out0  # no close(): the hooks the core holds do not keep it alive
    gc.collect()
    assert _stream_threads() == before
