"""The C++ driver ``mtcompile-run``: builds it and says where it is.

``mtcompile-run BUNDLE_DIR ENTRY INPUT_DIR OUTPUT_DIR [--threads N] [--timing]
[--verify-key-file FILE]`` loads a saved bundle with TVM's runtime library only (no Python,
no compiler, no torch), runs one tenant or ``run_all`` on ``INPUT_DIR/<tenant>.<input>.npy``
and writes ``OUTPUT_DIR/<tenant>.<output>.npy`` (names made safe: `contract.file_name`); it
checks the bundle with the runtime core `mtcompile.load` calls too (`mtcompile.core`, whose
headers it includes) and the inputs with the core's check of a call (`Bundle.run`'s checks
and words; each ``<tenant>.*.npy`` file is one input given) first;
``--timing`` prints
``{"load_s", "first_call_s", "peak_rss_kib"}`` as JSON. Exit status: 0 ok,
2 usage, 3 bad input or bundle, 4 run-time error. It is the proof that a bundle is one native
executable, and the start of a C++ serving backend (``src/run_bundle.cc``; the contract in
``mtcompile/core/src``).

The package's build compiles it (`mtcompile.core.build`, run by ``setup.py``) beside this
module; `build()` is that file, or where it is absent or stale, the driver compiled here once
with the system C++ compiler (cached). ``python -m mtcompile.driver`` prints its path.
"""

from __future__ import annotations

from mtcompile import core

__all__ = ["build", "command"]


def build() -> str:
    """``mtcompile-run``'s path: prebuilt, or compiled once here (cached)."""
    return core.native_path(core.build.DRIVER)


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
