"""The native runtime core: the artifact contract in C++ (``src/``), one implementation for
both front-ends. ``mtcompile-run`` includes its headers; the Python runtime loads it as a
shared library whose static init block registers ``mtcompile.core.*`` as TVM global
functions (bound by `mtcompile.runtime.contract`).

The package's build compiles it (`mtcompile.core.build`, run by ``setup.py``): a wheel carries
``libmtcompile_core.so``, an editable install builds it in the checkout. `library_path()` is
that file; only where it is absent or stale (a source edited since, another tvm-ffi or TVM)
is the core compiled here, with the system C++ compiler, once (cached, with a one-line notice),
or refused with how to build it when there is no compiler. `load()` loads it into the process
(idempotent). Loading needs tvm_ffi only: neither the compiler's ``tvm`` nor torch."""

from __future__ import annotations

import threading

from mtcompile.core import build
from mtcompile.errors import MTCompileError
from mtcompile.native import cache_dir

__all__ = ["HINT", "build", "library_path", "load", "native_path"]

_lock = threading.Lock()
_loaded: str | None = None
# how to get the native parts without compiling at run time
HINT = (
    "; reinstall mtcompile where a compiler is (`pip install mtcompile` builds them into its "
    "wheel), or run `python -m mtcompile.core` once where one is"
)


def native_path(target: build.Target) -> str:
    """`target`'s file: the prebuilt one when current, else compiled here once (cached)."""
    try:
        return build.cached(target, cache_dir(), HINT)
    except build.BuildError as e:
        raise MTCompileError(str(e)) from None


def library_path() -> str:
    """The core as a shared library (prebuilt, or compiled once here)."""
    return native_path(build.CORE)


def load(ffi) -> str:
    """Load the core into this process through `ffi` (the tvm_ffi module), once; its path."""
    global _loaded
    with _lock:
        if _loaded is None:
            path = library_path()
            ffi.load_module(path)
            _loaded = path
    return _loaded
