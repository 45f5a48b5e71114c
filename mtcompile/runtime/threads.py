"""The one thread pool of a bundle's run: its size for this process (``threads=``) and no
spinning after a call returns.

Once the native kernels are loaded, the pool is theirs (`mtcompile/native/src/pool.h`): it
serves TVM's generated kernels too (it is registered as TVM's parallel-launch functions), is
sized per calling thread at will, and its workers spin between parallel regions only while a
run is in progress (`run_marks`: the runtime marks each entry call). Without them it is TVM's:

TVM sizes a thread's pool from ``TVM_NUM_THREADS`` when that thread first launches parallel
work (one pool per calling thread; without the variable, cores / 2 on x86-64), and reads
``TVM_THREAD_POOL_SPIN_COUNT`` once per process when its first worker starts (by default
workers spin ~0.25 s of CPU after each parallel region). Both are set here, before any pool
starts, unless the user set them. A pool that already started can be made smaller
(``runtime.config_threadpool``) but never larger: that is said with a warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from mtcompile.errors import MTCompileError
from mtcompile.runtime.cpu import usable_cores

NUM_THREADS, SPIN_COUNT = "TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT"
_ours: dict[str, str] = {}  # the variables this module set, and to what


@dataclass(frozen=True)
class ThreadConfig:
    """requested: threads asked for (``threads=``, default the cores); pool: the calling
    thread's TVM pool size after configuring; source: who chose the size (``threads``, or
    the user's ``TVM_NUM_THREADS``); spin_count: the workers' spin count in force."""

    requested: int
    pool: int
    source: str
    spin_count: str


def user_set(var: str) -> bool:
    """Whether `var` is in the environment with a value this module did not put there."""
    return var in os.environ and os.environ[var] != _ours.get(var)


def _native_pool():
    """The native kernels' pool size function (`mtcompile/native/src/pool.h`), None before
    they are loaded: once they are, every parallel loop of a bundle runs on that pool."""
    from mtcompile.runtime.tvmrt import ffi

    return ffi().get_global_func("mtcompile.native.pool_threads", allow_missing=True)


def pool_size() -> int:
    """The calling thread's pool size: the native pool's, else TVM's (starting its pool if it
    has none yet)."""
    from mtcompile.runtime.tvmrt import ffi

    native = _native_pool()
    if native is not None:
        return int(native(0))
    return int(ffi().get_global_func("runtime.NumThreads")())


def limit_pool(threads: int) -> None:
    """At most `threads` threads in the calling thread's pool (a stream's thread)."""
    native = _native_pool()
    if native is not None:
        if native(0) > threads:
            native(threads)
        return
    if pool_size() > threads:
        import tvm_ffi

        tvm_ffi.get_global_func("runtime.config_threadpool")(1, threads)


def configure(threads: int | None = None) -> ThreadConfig:
    """Size TVM's pool for this process to `threads` (default: the cores this process may use, `cpu.usable_cores`) and turn
    spinning off, unless the user set ``TVM_NUM_THREADS`` / ``TVM_THREAD_POOL_SPIN_COUNT``;
    then check the calling thread's pool, shrink it if it started larger, warn if it
    started smaller (TVM cannot add workers to a started pool)."""
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise MTCompileError(f"threads must be a positive integer, got {threads!r}")
    wanted, source = _wanted(threads)
    if source == "threads":
        os.environ[NUM_THREADS] = _ours[NUM_THREADS] = str(wanted)
    if not user_set(SPIN_COUNT):  # nothing spins after a call returns
        os.environ[SPIN_COUNT] = _ours[SPIN_COUNT] = "0"
    native = _native_pool()
    if native is not None:  # sized per thread at will: its threads start on first use
        return ThreadConfig(wanted, int(native(wanted)), source, os.environ[SPIN_COUNT])
    return ThreadConfig(wanted, _tvm_pool(wanted), source, os.environ[SPIN_COUNT])


# The warnings below name the line that called `configure` (their helper is one frame more).
def _wanted(threads: int | None) -> tuple[int, str]:
    """(threads wanted, where the number comes from): ``TVM_NUM_THREADS`` when the user set
    it to a positive integer (a different `threads` is ignored, with a warning), else
    `threads`, else the usable cores."""
    wanted = threads or usable_cores()
    source = "threads"
    if user_set(NUM_THREADS):
        try:
            user = int(os.environ[NUM_THREADS])
        except ValueError:
            user = 0
        if user >= 1:
            if threads is not None and threads != user:
                warnings.warn(
                    f"threads={threads} ignored: {NUM_THREADS}={user} is set in the "
                    "environment and wins",
                    RuntimeWarning,
                    stacklevel=4,
                )
            wanted, source = user, NUM_THREADS
        else:
            warnings.warn(
                f"{NUM_THREADS}={os.environ[NUM_THREADS]!r} is not a positive "
                f"integer; using {wanted} threads",
                RuntimeWarning,
                stacklevel=4,
            )
    return wanted, source


def _tvm_pool(wanted: int) -> int:
    """The size of the calling thread's TVM pool after shrinking it to `wanted` when it
    started larger; a warning when it started smaller (it cannot grow)."""
    pool = pool_size()
    if pool > wanted:
        import tvm_ffi

        tvm_ffi.get_global_func("runtime.config_threadpool")(1, wanted)
        pool = pool_size()
    if pool != wanted:
        warnings.warn(
            f"TVM's thread pool of this thread started earlier with {pool} "
            f"thread(s) and cannot grow to the {wanted} requested; generated "
            f"kernels run on {pool}. Set threads (or {NUM_THREADS}) before the "
            "first bundle runs in this process",
            RuntimeWarning,
            stacklevel=4,
        )
    return pool


def run_marks():
    """(begin, end): the functions that mark a run in progress on the native pool (its
    workers spin between parallel regions until the end), or None without native kernels."""
    from mtcompile.runtime.tvmrt import ffi

    begin = ffi().get_global_func("mtcompile.native.run_begin", allow_missing=True)
    return None if begin is None else (begin, ffi().get_global_func("mtcompile.native.run_end"))


def set_torch_threads(threads: int) -> None:
    """The calling thread's PyTorch (OpenMP/MKL) count, for the library provider's calls;
    nothing when torch was never imported (no library kernels here)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
