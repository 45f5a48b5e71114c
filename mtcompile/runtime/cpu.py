"""The cores this process may use. (The check that refuses a bundle compiled for CPU features
this host lacks is the runtime core's rule cpu-features: `mtcompile.runtime.contract`.)"""

from __future__ import annotations

from pathlib import Path


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its affinity mask (``taskset``), capped by a cgroup
    v2 CPU quota (``cpu.max``: "quota period", rounded up), at least 1. ``os.cpu_count()``
    sees neither; the native pool sizes itself the same way (``usable_cores`` in pool.h)."""
    import os

    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            n = min(n, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return max(1, n)
