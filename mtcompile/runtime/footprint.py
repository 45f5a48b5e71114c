"""A bundle's resident cost in bytes, split into runtime, code, weights and arena: measured on
load from ``/proc/self`` where it can be, computed from the manifest and file sizes where not.

- runtime: resident pages of the libraries every bundle shares: TVM's runtime library,
  tvm-ffi, the BLAS (``compiler``: TVM's compiler library, when this process imported tvm).
- code: resident pages of the bundle's library on load. The executable's serialized part
  (bytecode, small constants) is unpacked on load, after which the read-only pages that held
  it are handed back to the kernel (`release_read_only`).
- weights: the bundle's weights table, which the library carries as raw data and the runtime
  maps in place (`mtcompile.runtime.weights`: resident once touched, never copied), plus the
  anonymous memory the process gained while TVM loaded the library (small constants; a
  measure: any other thread's allocation counts).
- arena: the planned bytes of ``run_all``'s intermediates (the manifest's memory plan; TVM's
  pooled allocator takes them on the first run and keeps them, once per VM).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
from collections.abc import Callable
from pathlib import Path

from mtcompile.runtime.manifest import Manifest

# mapped files counted as the shared runtime, by file name
RUNTIME_FILES = re.compile(
    r"lib(tvm_runtime|tvm_runtime_extra|tvm_ffi|scipy_openblas)\.so"
    r"|tvm_ffi/core\..*\.so"
)
COMPILER_FILES = re.compile(r"libtvm_compiler\.so")
_DELETED = " (deleted)"
MADV_PAGEOUT = 21  # <sys/mman.h>, Linux


def available() -> bool:
    """Whether this system has the /proc files measuring needs (Linux)."""
    return os.path.exists("/proc/self/smaps") and os.path.exists("/proc/self/status")


def anon_bytes() -> int:
    """The process's resident anonymous memory (RssAnon)."""
    return _status_kib("RssAnon") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def mapped_bytes() -> dict[str, int]:
    """Resident bytes of each mapped file, by path (``/proc/self/smaps``)."""
    out: dict[str, int] = {}
    path = None
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=5)
            if len(first) >= 5 and "-" in first[0] and not first[0].endswith(":"):
                path = first[5].rstrip("\n").removesuffix(_DELETED) if len(first) > 5 else None
            elif path is not None and line.startswith("Rss:"):
                out[path] = out.get(path, 0) + int(line.split()[1]) * 1024
    return out


def _library_maps(library: str) -> list[tuple[int, int, str]]:
    """(start, end, permissions) of each mapping of `library` (``/proc/self/maps``)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n").removesuffix(_DELETED) == library:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[1]))
    return out


def release_read_only(library: Path) -> int:
    """Advise the kernel to page out `library`'s read-only, non-executable mappings
    (``MADV_PAGEOUT``, Linux 5.4+: contents are kept, pages are read back from the file if
    touched again): once TVM has unpacked the serialized weights they hold, nothing reads
    them. Returns the bytes advised (0 where the kernel refuses)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for lo, hi, perms in _library_maps(str(library)):
        if perms == "r--p" and libc.madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
            advised += hi - lo
    return advised


def _sum(maps: dict[str, int], match: Callable[[str], bool]) -> int:
    return sum(v for k, v in maps.items() if match(k))


def measure_load(load: Callable[[], object], library: Path) -> tuple[object, dict]:
    """Run `load` (it loads `library`), then page out the library's read-only data
    (`release_read_only`); returns what `load` returns and the measured runtime, code and
    weights bytes (None each where /proc cannot be read)."""
    if not available():
        return load(), {"runtime": None, "compiler": None, "code": None, "weights": None}
    before = anon_bytes()
    module = load()
    weights = max(0, anon_bytes() - before)
    release_read_only(library)
    maps = mapped_bytes()
    lib = str(library)
    return module, {
        "runtime": _sum(maps, lambda p: RUNTIME_FILES.search(p) is not None),
        "compiler": _sum(maps, lambda p: COMPILER_FILES.search(p) is not None),
        "code": _sum(maps, lambda p: p == lib),
        "weights": weights,
    }


def arena_bytes(manifest: Manifest) -> int | None:
    """run_all's planned arena (None when the bundle has no memory plan)."""
    m = manifest.memory
    return m.arena_bytes if m is not None and m.planned else None


def weight_bytes(manifest: Manifest) -> int:
    """The bundle's constants in bytes: its weights table (packed layouts included), else
    the graph's count after deduplication."""
    if manifest.weights is not None:
        return manifest.weights.bytes
    return (
        manifest.memory.weight_bytes if manifest.memory is not None else manifest.graph.weight_bytes
    )


def runtime_file_bytes() -> int | None:
    """File sizes of the shared runtime libraries (an upper bound of their resident pages);
    None where TVM's wheel is not found."""
    from mtcompile import native

    try:  # from the wheels' metadata: importing tvm_ffi would load it (and torch)
        tvm_lib, blas = native.tvm_lib_dir(), native.blas_lib_dir()
        ffi_lib = Path(
            importlib.metadata.distribution("apache-tvm-ffi").locate_file(
                "tvm_ffi/lib/libtvm_ffi.so"
            )
        )
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return None
    files = [tvm_lib / "libtvm_runtime.so", ffi_lib, blas / "libscipy_openblas.so"]
    return sum(f.stat().st_size for f in files if f.is_file())


def report(manifest: Manifest, measured: dict | None, library_size: int | None) -> dict:
    """The footprint as ``{runtime, code, weights, arena (bytes or None), total, source:
    {part: "measured on load" | "computed"}}``: measured where `measured` has the part, else
    computed (runtime: library file sizes; code: the library's size less the weights it
    carries; weights: the manifest's constants; arena: the manifest's plan, always)."""
    measured = measured or {}
    weights = weight_bytes(manifest)
    computed = {
        "runtime": runtime_file_bytes(),
        "code": None if library_size is None else max(0, library_size - weights),
        "weights": weights,
    }
    out: dict = {"source": {}}
    for part in ("runtime", "code", "weights"):
        got = measured.get(part)
        out[part] = got if got is not None else computed[part]
        out["source"][part] = "measured on load" if got is not None else "computed"
    if manifest.weights is not None and measured.get("weights") is not None:
        # the table the library carries is mapped, not unpacked: resident once touched
        out["weights"] += manifest.weights.bytes
        out["source"]["weights"] = "measured on load, plus the mapped weights table"
    out["arena"] = arena_bytes(manifest)
    out["source"]["arena"] = "computed"
    if measured.get("compiler"):
        out["compiler"] = measured["compiler"]
        out["source"]["compiler"] = "measured on load"
    out["total"] = sum(v for k, v in out.items() if k != "source" and v is not None)
    return out
