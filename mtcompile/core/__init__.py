"""The native runtime core: the artifact contract in C++ (``src/``), one implementation for
both front-ends. ``mtcompile-run`` includes its headers; the Python runtime loads it as a
shared library whose static init block registers ``mtcompile.core.*`` as TVM global
functions (bound by `mtcompile.runtime.contract`).

`library_path()` compiles ``src/core.cc`` with the system C++ compiler against the installed
tvm-ffi's headers (as `mtcompile.driver` builds the driver), cached by a hash of sources and
flags; `load()` loads it into the process (idempotent). Loading needs tvm_ffi only: neither
the compiler's ``tvm`` nor torch."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import threading
from pathlib import Path

from mtcompile.errors import MTCompileError
from mtcompile.native import cache_dir

__all__ = ["SRC", "compile_cached", "include_flags", "library_path", "load", "tvm_version_flag"]

SRC = Path(__file__).parent / "src"
_lock = threading.Lock()
_loaded: str | None = None


def tvm_version_flag() -> list[str]:
    """The TVM the core checks bundles against (rule tvm-version): the installed wheel's."""
    try:
        return [f'-DMTC_TVM_VERSION="{importlib.metadata.version("apache-tvm")}"']
    except importlib.metadata.PackageNotFoundError:  # a source build: not checked
        return []


def include_flags() -> list[str]:
    """The compiler flags that find the core's headers and tvm-ffi's."""
    import tvm_ffi.libinfo as info

    return [f"-I{SRC}", f"-I{info.find_include_path()}", f"-I{info.find_dlpack_include_path()}"]


def _flags() -> list[str]:
    import tvm_ffi.libinfo as info

    ffi_lib = Path(info.find_libtvm_ffi()).parent
    return [
        "-std=c++17",
        "-O2",
        "-shared",
        "-fPIC",
        *tvm_version_flag(),
        *include_flags(),
        str(SRC / "core.cc"),
        f"-L{ffi_lib}",
        "-ltvm_ffi",
        f"-Wl,-rpath,{ffi_lib}",
    ]


def compile_cached(
    what: str, cache: str, file_name: str, source_dirs, flags: list[str], hint: str = ""
) -> str:
    """Compile with the system C++ compiler (``$CXX``, g++, c++) once: the output's path,
    cached under `cache` by the ``.cc``/``.h`` files of `source_dirs` and `flags`. `what`
    names the build in errors; `hint` says how to build it ahead of time."""
    sources = b"".join(
        p.name.encode() + p.read_bytes()
        for d in source_dirs
        for p in sorted(d.iterdir())
        if p.suffix in (".cc", ".h")
    )
    key = hashlib.sha256(sources + repr(flags).encode()).hexdigest()[:16]
    out = cache_dir() / f"{cache}-{key}" / file_name
    if out.exists():
        return str(out)
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise MTCompileError(f"building {what} needs a C++ compiler (g++), none found{hint}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{file_name}.{os.getpid()}.tmp")
    res = subprocess.run([cxx, *flags, "-o", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        raise MTCompileError(f"building {what} failed:\n{res.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same file
    return str(out)


def library_path() -> str:
    """The core as a shared library, compiled once (cached by sources and flags)."""
    return compile_cached(
        "mtcompile's runtime core",
        "core",
        "libmtcompile_core.so",
        [SRC],
        _flags(),
        "; build it once with `python -m mtcompile.core`",
    )


def load(ffi) -> str:
    """Load the core into this process through `ffi` (the tvm_ffi module), once; its path."""
    global _loaded
    with _lock:
        if _loaded is None:
            path = library_path()
            ffi.load_module(path)
            _loaded = path
    return _loaded
