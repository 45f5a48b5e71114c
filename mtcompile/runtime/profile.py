"""Time per VM call: a trace of one entry's calls, and a per-kernel profile by tenant.

TVM 0.27's Relax VM has no profiling mode of its own (no ``profile=`` argument to
`VirtualMachine`, and executables carry no ``vm_profiler_load_executable``), so calls are
timed through the VM's instrument hook, which sees every kernel, library call and builtin.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from mtcompile.runtime.vm import ThreadVMs


def trace(vms: ThreadVMs, entry: str, arrays: Sequence[np.ndarray], repeat: int = 1) -> list[list]:
    """Run `entry` `repeat` times under the VM instrument; per run, the calls it made as
    ``(symbol, microseconds)`` in order (kernels, library calls and VM builtins)."""
    runs: list[list] = []
    starts: list[float] = []

    def instrument(func, symbol, before, ret, *args):
        if before:
            starts.append(time.perf_counter())
        else:
            runs[-1].append((symbol, 1e6 * (time.perf_counter() - starts.pop())))
        return 0

    vm = vms.vm()
    vm.set_instrument(instrument)
    try:
        for _ in range(repeat):
            runs.append([])
            vms.call(entry, arrays)
    finally:
        vm.set_instrument(None)
    return runs


def kernel_table(runs: list[list]) -> dict:
    """``{"total_us", "kernels": [{name, calls, total_us, mean_us, share}]}`` from the
    traces of one entry: each call's time is its median over the runs; sorted by time."""
    kernels: dict[str, dict] = {}
    for calls in zip(*runs, strict=True):
        symbol = calls[0][0]
        k = kernels.setdefault(symbol, {"name": symbol, "calls": 0, "total_us": 0.0})
        k["calls"] += 1
        k["total_us"] += float(np.median([us for _, us in calls]))
    total = sum(k["total_us"] for k in kernels.values())
    rows = sorted(kernels.values(), key=lambda k: -k["total_us"])
    for k in rows:
        k["mean_us"] = k["total_us"] / k["calls"]
        k["share"] = k["total_us"] / total if total else 0.0
    return {"total_us": total, "kernels": rows}
