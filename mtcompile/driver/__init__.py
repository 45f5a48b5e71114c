"""The C++ driver ``mtcompile-run``: builds it and says where it is.

``mtcompile-run BUNDLE_DIR ENTRY INPUT_DIR OUTPUT_DIR [--threads N] [--timing]
[--verify-key-file FILE]`` loads a saved bundle with TVM's runtime library only (no Python,
no compiler, no torch), runs one tenant or ``run_all`` on ``INPUT_DIR/<tenant>.<input>.npy``
and writes ``OUTPUT_DIR/<tenant>.<output>.npy`` (names made safe: `contract.file_name`); it
checks the bundle with the runtime core `mtcompile.load` calls too (`mtcompile.core`, whose
headers it includes) and inputs against the manifest (shape, dtype, index ranges) first;
``--timing`` prints
``{"load_s", "first_call_s", "peak_rss_kib"}`` as JSON. Exit status: 0 ok,
2 usage, 3 bad input or bundle, 4 run-time error. It is the proof that a bundle is one native
executable, and the start of a C++ serving backend (``src/run_bundle.cc``; the contract in
``mtcompile/core/src``).

`build()` compiles it with the system C++ compiler against the headers and libraries of the
installed tvm-ffi and TVM wheels (rpaths to them), cached by a hash of source and flags.
``python -m mtcompile.driver`` builds it and prints its path.
"""

from __future__ import annotations

from pathlib import Path

from mtcompile import core
from mtcompile.native import blas_lib_dir, tvm_lib_dir

__all__ = ["build", "command"]

_SRC = Path(__file__).parent / "src" / "run_bundle.cc"


def _flags() -> list[str]:
    import tvm_ffi.libinfo as info

    ffi_lib = Path(info.find_libtvm_ffi()).parent
    # --no-as-needed: a bundle's library links TVM's runtime and the BLAS by name, without a
    # path; the driver loads them first, from the wheels (as mtcompile.native.preload does)
    libs = [
        f"-L{ffi_lib}",
        "-ltvm_ffi",
        f"-Wl,-rpath,{ffi_lib}",
        "-Wl,--no-as-needed",
        f"-L{tvm_lib_dir()}",
        "-ltvm_runtime",
        f"-Wl,-rpath,{tvm_lib_dir()}",
        f"-L{blas_lib_dir()}",
        "-lscipy_openblas",
        f"-Wl,-rpath,{blas_lib_dir()}",
    ]
    # the runtime core's headers (the contract the Python runtime calls) and the TVM the
    # driver links: a bundle built with another is refused (rule tvm-version)
    return ["-std=c++17", "-O2", *core.tvm_version_flag(), *core.include_flags(), str(_SRC), *libs]


def build() -> str:
    """Compile ``mtcompile-run`` once (cached by source and flags); its path."""
    return core.compile_cached(
        "mtcompile-run", "driver", "mtcompile-run", [_SRC.parent, core.SRC], _flags()
    )


def command(
    bundle_dir,
    entry: str,
    input_dir,
    output_dir,
    threads: int | None = None,
    timing: bool = False,
    verify_key_file=None,
    require_signature: bool = False,
) -> list:
    """The argument list that runs `entry` of the bundle at `bundle_dir` with the driver
    (with `verify_key_file`: the bundle must carry a signature made with that key; with
    `require_signature`: a key, that file or MTCOMPILE_VERIFY_KEY, must be given)."""
    cmd = [build(), str(bundle_dir), entry, str(input_dir), str(output_dir)]
    return (
        cmd
        + (["--threads", str(threads)] if threads else [])
        + (["--timing"] if timing else [])
        + (["--verify-key-file", str(verify_key_file)] if verify_key_file else [])
        + (["--require-signature"] if require_signature else [])
    )
