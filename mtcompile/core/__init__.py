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

__all__ = ["SRC", "include_flags", "library_path", "load", "tvm_version_flag"]

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


def library_path() -> str:
    """The core as a shared library, compiled once (cached by sources and flags)."""
    flags = _flags()
    sources = b"".join(
        p.name.encode() + p.read_bytes() for p in sorted(SRC.iterdir()) if p.suffix in (".cc", ".h")
    )
    key = hashlib.sha256(sources + repr(flags).encode()).hexdigest()[:16]
    out = cache_dir() / f"core-{key}" / "libmtcompile_core.so"
    if out.exists():
        return str(out)
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise MTCompileError(
            "building mtcompile's runtime core needs a C++ compiler (g++), "
            "none found; build it once with `python -m mtcompile.core`"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"libmtcompile_core.{os.getpid()}.tmp")
    res = subprocess.run([cxx, *flags, "-o", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        raise MTCompileError(f"building mtcompile's runtime core failed:\n{res.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same file
    return str(out)


def load(ffi) -> str:
    """Load the core into this process through `ffi` (the tvm_ffi module), once; its path."""
    global _loaded
    with _lock:
        if _loaded is None:
            path = library_path()
            ffi.load_module(path)
            _loaded = path
    return _loaded
