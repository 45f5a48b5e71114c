"""The host CPU's instruction-set features, read from /proc/cpuinfo (no TVM compiler needed),
and the check that refuses a bundle compiled for features this CPU lacks."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

# LLVM feature name -> the /proc/cpuinfo flag of the same instructions (x86-64). Only
# instruction-set features are checked: LLVM also lists tuning hints (fast-*, slow-*,
# macrofusion...) and features that hypervisors hide from cpuinfo (rdpru, mwaitx) that
# have no flag or no fault when absent; those are not checked.
LLVM_TO_CPUINFO = {
    "sse": "sse", "sse2": "sse2", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1",
    "sse4.2": "sse4_2", "sse4a": "sse4a", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "fma4": "fma4", "xop": "xop", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "popcnt": "popcnt", "movbe": "movbe", "aes": "aes",
    "pclmul": "pclmulqdq", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "sha": "sha_ni",
    "adx": "adx", "cx16": "cx16", "gfni": "gfni",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw",
    "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2",
    "avx512vnni": "avx512_vnni", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni",
    "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
}


@lru_cache(maxsize=1)
def host_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The ``flags`` of the first processor in `cpuinfo`; None where there is none to read
    (not Linux, or not x86: nothing is checked there)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def missing_features(features: Iterable[str], flags: frozenset[str] | None = None
                     ) -> list[str]:
    """The LLVM `features` (checked ones only) whose cpuinfo flag the host lacks."""
    flags = host_flags() if flags is None else flags
    if flags is None:
        return []
    return sorted(f for f in (x.lstrip("+") for x in features)
                  if f in LLVM_TO_CPUINFO and LLVM_TO_CPUINFO[f] not in flags)


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
