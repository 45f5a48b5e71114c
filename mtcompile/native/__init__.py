"""Native heavy kernels: builds, loads and registers the C++ library calls.

`register()` compiles ``src/*.cc`` (one file per kernel family, ``registration.cc``) with the
system C++ compiler (``tvm_ffi.cpp.build``) beside ``kernels_table.h``, generated from the one
table of kernels (`mtcompile.native.table`), caches the shared library by a hash of its
sources, that header and the flags, and loads it: its static init block registers every
native form the table lists (``mtcompile.native.matmul_bias_relu``, ...) as a TVM global
function (argument order: `mtcompile.native.table`). The BLAS
is scipy-openblas32, kept single-threaded; each kernel splits its work over TVM's thread pool.
Loading needs neither torch nor ``tvm`` (the compiler): only tvm_ffi, TVM's runtime library and the BLAS.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

from mtcompile.native import table

__all__ = [
    "PANEL",
    "cache_dir",
    "export_options",
    "has_bf16_dot",
    "library_path",
    "object_path",
    "pack_dense",
    "pack_dense_bf16",
    "preload",
    "register",
    "source_hash",
    "table",
    "winograd_weights",
    "winograd_weights_bf16",
]

PANEL = 16  # columns per panel of a packed dense weight
_SRC = Path(__file__).parent / "src"
_CFLAGS = ("-O3", "-fno-math-errno", "-fno-gnu-unique")  # no unique symbols: dlclose unloads
_loaded: str | None = None
_HEADER = "kernels_table.h"  # generated into the build directory from `table`


def _package_dir(name: str) -> Path:
    # find_spec, not import: `import tvm` maps the 259 MB compiler library
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"mtcompile.native needs the package {name!r}, which is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def blas_lib_dir() -> Path:
    """The directory of the BLAS shared library (scipy-openblas32's wheel)."""
    return _package_dir("scipy_openblas32") / "lib"


def tvm_lib_dir() -> Path:
    """The directory of libtvm_runtime.so, whose thread pool the kernels use: found from the
    apache-tvm wheel's metadata (a process that loads bundles may block ``import tvm``, and
    find_spec goes through the import system), else from the package's location."""
    try:
        lib = Path(importlib.metadata.distribution("apache-tvm").locate_file("tvm/lib"))
    except importlib.metadata.PackageNotFoundError:  # a source build of TVM
        lib = None
    if lib is not None and (lib / "libtvm_runtime.so").is_file():
        return lib
    return _package_dir("tvm") / "lib"


def has_bf16_dot(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AVX-512 BF16 (VDPBF16PS, the bf16 kernels' fast path); True
    where `cpuinfo` cannot be read (nothing to warn about then)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return True
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return "avx512_bf16" in flags.split()


def cache_dir() -> Path:
    """mtcompile's cache directory: ``MTCOMPILE_CACHE_DIR``, else the user's cache dir."""
    base = os.environ.get("MTCOMPILE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtcompile"
    )
    return Path(base)


def _flags() -> tuple[list[str], list[str]]:
    blas, tvm = blas_lib_dir(), tvm_lib_dir()
    ldflags = [
        f"-L{blas}",
        "-lscipy_openblas",
        f"-Wl,-rpath,{blas}",
        f"-L{tvm}",
        "-ltvm_runtime",
        f"-Wl,-rpath,{tvm}",
    ]
    # no checkout or site-packages path inside the object: a bundle's bytes do not depend on
    # where mtcompile and tvm-ffi are installed
    prefix_maps = [
        f"-ffile-prefix-map={_SRC}=mtcompile/native/src",
        f"-ffile-prefix-map={_package_dir('tvm_ffi')}=tvm_ffi",
    ]
    return [*_CFLAGS, *prefix_maps], ldflags


def source_hash() -> str:
    """A hash of the kernels' sources and build flags (names the cached builds)."""
    h = hashlib.sha256()
    for s in sorted(_SRC.glob("*.[ch]*")):
        h.update(s.name.encode() + b"\0" + s.read_bytes())
    h.update(_HEADER.encode() + b"\0" + table.header().encode())
    h.update(repr(_flags()).encode())
    return h.hexdigest()[:16]


def _ninja_on_path() -> None:
    """tvm_ffi.cpp.build runs ``ninja`` from PATH: put the ninja wheel's binary first, so a
    machine without a system ninja (or whose PATH lacks the wheel's bin dir) still builds."""
    try:
        import ninja
    except ImportError:
        return  # a system ninja, if any, is used
    bin_dir = str(ninja.BIN_DIR)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _build(output: str) -> str:
    # one build directory per output: each holds its own build.ninja
    build_dir = cache_dir() / "native" / f"kernels-{source_hash()}" / output.replace(".", "_")
    path = build_dir / output
    if path.exists():
        return str(path)
    import tvm_ffi.cpp

    _ninja_on_path()
    cflags, ldflags = _flags()
    # the generated table beside the build (the installed sources may be read-only), mapped
    # like the sources: no cache path inside the object
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / _HEADER).write_text(table.header())
    cflags += [f"-I{build_dir}", f"-I{_SRC}", f"-ffile-prefix-map={build_dir}=mtcompile/native/src"]
    sources = [str(s) for s in sorted(_SRC.glob("*.cc"))]
    return str(
        tvm_ffi.cpp.build(
            "mtcompile_native",
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            output=output,
        )
    )


def library_path() -> str:
    """The kernels as a shared library (built once, cached by `source_hash`)."""
    return _build("mtcompile_native.so")


def object_path() -> str:
    """The kernels as one relocatable object, to link into an exported bundle."""
    return _build("mtcompile_native.o")


def export_options() -> dict:
    """Keyword arguments for ``Executable.export_library`` that link the kernels into the
    bundle's library: loading it registers them (first registration wins). The BLAS and
    TVM's runtime are linked by name without a path: `preload` provides them at load."""
    return {
        "addons": [object_path()],
        # --no-as-needed: the libraries come before the objects on the command line
        "options": [
            "-Wl,--no-as-needed",
            f"-L{blas_lib_dir()}",
            "-lscipy_openblas",
            f"-L{tvm_lib_dir()}",
            "-ltvm_runtime",
        ],
    }


def preload() -> None:
    """Load what the kernels link against, globally, from the installed wheels (no torch, no
    compiler): TVM's runtime and the BLAS. Call before loading a bundle that links them."""
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which libtvm_runtime.so needs)

    ctypes.CDLL(str(tvm_lib_dir() / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(blas_lib_dir() / "libscipy_openblas.so"), mode=ctypes.RTLD_GLOBAL)


def pack_dense(w):
    """A dense layer's weight ``w`` [K, N] as the panels ``dense_packed`` takes:
    [ceil(N / 16), K, 16], panel p holding columns 16p..16p+15 (zero past N)."""
    import numpy as np

    k, n = w.shape
    panels = -(-n // PANEL)
    padded = np.zeros((k, panels * PANEL), dtype=w.dtype)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2))


def pack_dense_bf16(w):
    """A dense layer's weight ``w`` [K, N] (float32) as the panels ``dense_bf16`` takes:
    bfloat16 bits (uint16, rounded to nearest even) [ceil(N / 16), ceil(K / 2), 32], panel p
    holding columns 16p..16p+15 (zero past N) as pairs, element [p, j, 2c + h] being
    w[2j + h, 16p + c] (zero past K)."""
    import numpy as np

    k, n = w.shape
    panels, pairs = -(-n // PANEL), -(-k // 2)
    padded = np.zeros((2 * pairs, panels * PANEL), dtype=np.float32)
    padded[:k, :n] = w
    rounded = _bf16_bits(padded)
    # [2 * pairs, panels * 16] -> [panels, pairs, 16 columns, 2 halves]
    out = rounded.reshape(pairs, 2, panels, PANEL).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(out.reshape(panels, pairs, 2 * PANEL))


def winograd_weights(w):
    """A 3x3 conv's weight ``w`` [O, C, 3, 3] as the ``winograd`` variant of conv2d takes it:
    U = G w G^T per (o, c) for Winograd's F(2x2, 3x3), [16, O, C] with position 4 * row +
    column of the 4x4 first (computed in float64, stored as w's dtype)."""
    import numpy as np

    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    u = np.einsum("ik,ockl,jl->ijoc", g, w.astype(np.float64), g)
    return np.ascontiguousarray(u.reshape(16, *w.shape[:2]).astype(w.dtype))


def winograd_weights_bf16(w):
    """`winograd_weights` as the ``winograd_bf16`` variant of conv2d takes it: bfloat16 bits
    (uint16, rounded to nearest even) [16, O, 2 * ceil(C / 2)], channels in pairs (a zero
    past C)."""
    import numpy as np

    u = winograd_weights(w.astype(np.float32))
    padded = np.zeros((*u.shape[:2], -(-u.shape[2] // 2) * 2), np.float32)
    padded[..., : u.shape[2]] = u
    return _bf16_bits(padded)


def _bf16_bits(x):
    """float32 array `x` as bfloat16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    import numpy as np

    bits = x.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[np.isnan(x)] = 0x7FC0
    return rounded


def register() -> str:
    """Load the kernels library (building it once), registering its global functions.

    Idempotent; returns the library's path."""
    global _loaded
    if _loaded is not None:
        return _loaded
    path = library_path()
    preload()
    import tvm_ffi

    tvm_ffi.load_module(path)
    _loaded = path
    return path
