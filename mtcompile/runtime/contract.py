"""The artifact contract, bound from the native runtime core (`mtcompile.core`, C++): the one
implementation of its rules, which ``mtcompile-run`` includes too, so both front-ends refuse
the same things with the same first line. This module names the rules (`RULES`), loads the
core, and turns its refusals into `ArtifactError`.

A bundle's weights table (``manifest.json``'s ``weights``) is bound to the library: the
library carries its own copy (symbol `TABLE_SYMBOL`, the table's JSON) and the end of its
weights (`END_SYMBOL`), so the library hash covers them. Every table, the manifest's and the
library's, is checked against the weights symbol's size before a byte of it is viewed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from mtcompile import core
from mtcompile.errors import ArtifactError, MTCompileError

TABLE_SYMBOL = "mtcompile_weights_table"  # NUL-terminated JSON of the library's own table
END_SYMBOL = "mtcompile_weights_end"  # one past the weights symbol's last byte
ALIGN = 64
# a weight's dtype -> bytes per element (the core's kWeightDTypes, which checks them)
WEIGHT_DTYPES = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "uint16": 2,  # bfloat16 bits: a dense layer's weight packed as bfloat16 (variant bf16)
}
VERIFY_KEY_ENV = "MTCOMPILE_VERIFY_KEY"  # a service's verify key (the core reads it)

# The rules, by name, in the order the core checks them (mtcompile/core/src: contract.h,
# manifest.h, library.h).
RULES = {
    "format": "manifest.json's format is the one this mtcompile reads; its fields are there",
    "library-name": "manifest.json's library is a plain file name in the bundle directory",
    "run-all-inputs": "run_all_inputs names each tenant input exactly once",
    "tvm-version": "the bundle was built with this TVM (its executable format is not stable)",
    "cpu-features": "the host CPU has the instruction-set features the kernels were built for",
    "signature-required": "with require_signature, a verify key is given (or "
    "MTCOMPILE_VERIFY_KEY set)",
    "library-hash": "the library's sha256 is manifest.json's library_sha256 (before dlopen)",
    "signature": "with a verify key, the HMAC of the manifest and the library matches",
    "library-elf": "the library's ELF headers and segments lie inside the file",
    "weights-bytes": "the table's bytes fit the library's weights symbol",
    "weight-dtype": "each weight's dtype is one of WEIGHT_DTYPES",
    "weight-offset": "each weight's offset is >= 0 and a multiple of 64",
    "weight-shape": "each weight's dims are >= 0",
    "weight-extent": "offset + prod(shape) * itemsize ends within the weights symbol",
    "weights-same": "manifest.json's weights table equals the one the library carries",
    "embedded-manifest": "the manifest the library embeds equals manifest.json (less "
    "library_sha256, memory, weights, bundle_signature)",
    # a call's inputs (inputs.h), checked per call in both front-ends
    "input-count": "a call gives each of the tenant's inputs, no more (the driver: one file "
    "<tenant>.<name>.npy per input)",
    "input-type": "each input has its dtype and shape (a dynamic dim: any size)",
    "input-bounds": "a dynamic dim lies within its bounds [lo, hi]",
    "input-dims": "a dynamic dim has one size in every input of the call",
    "index-range": "an index input's values lie in its index_range [lo, hi)",
    "file-name": "an input file is <tenant>.<name>.npy, each character of the name outside "
    "[A-Za-z0-9_.-] replaced by '_'; outputs are the manifest's output_files",
}


def _fn(name: str):
    from mtcompile.runtime import tvmrt  # tvm_ffi, loaded with torch hidden

    ffi = tvmrt.ffi()
    core.load(ffi)
    return ffi.get_global_func(f"mtcompile.core.{name}")


def _call(name: str, *args) -> list:
    """The core's function `name` on `args`: its values, or its refusal raised."""
    kind, message, *values = _fn(name)(*args)
    if kind == "bad":
        raise ArtifactError(str(message))
    if kind:
        raise MTCompileError(f"mtcompile's runtime core: {message}")
    return list(values)


class Opened(NamedTuple):
    """A bundle checked up to its dlopen: the file its library came from, the manifest text
    the checks read, and whether a key verified its signature."""

    source: Path
    text: str
    verified: bool


def open_checked(
    directory: str | os.PathLike, private: Path, key: bytes | None, require_signature: bool
) -> Opened:
    """Check a saved bundle before any dlopen (format, library name, run_all inputs, TVM
    version, CPU features, signature required, library hash, signature, ELF headers) and
    copy its library to `private`, where it is checked: what is checked is what loads."""
    src, text, verified = _call("open", str(directory), str(private), key, require_signature)
    return Opened(Path(str(src)), str(text), bool(verified))


def check_loaded(directory, text: str, private: Path, where: Path) -> None:
    """What ``mtcompile-run`` checks after `open_checked`, in its order: the library loaded,
    its weights tables, its embedded manifest (for a manifest.json the Python reader refuses:
    the first rule broken is named alike by both front-ends)."""
    _call("check_loaded", str(directory), text, str(private), str(where))


class LibraryWeights(NamedTuple):
    """A loaded library's weights symbol (address, size) and the table it carries ("": it
    has no weights), checked against each other."""

    base: int
    size: int
    table: str


def library_weights(private: Path, where: Path) -> LibraryWeights:
    """The weights of the library TVM loaded from `private` (named `where` in errors)."""
    base, size, table = _call("library_weights", str(private), str(where))
    return LibraryWeights(int(base), int(size), str(table))


def check_weights(directory, text: str, lib: LibraryWeights, where: Path) -> None:
    """manifest.json's table (in `text`) against the library's own and its symbol's size."""
    _call("check_weights", str(directory), text, lib.table, lib.size, str(where))


def check_table(table: str, size: int, where: str) -> None:
    """One weights table (its JSON) against a weights symbol of `size` bytes."""
    _call("check_table", table, size, str(where))


def check_embedded(directory, text: str, embedded: bytes, where: Path) -> None:
    """The manifest the library embeds must equal ``manifest.json`` (`text`)."""
    try:
        embedded_text = bytes(embedded).decode()
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{where}: has no readable embedded manifest: {e}") from e
    _call("check_embedded", str(directory), text, embedded_text, str(where))


def file_name(tenant: str, name: str) -> str:
    """The file of a tenant's input (rule "file-name"): ``<tenant>.<name>.npy`` with every
    character of `name` outside ``[A-Za-z0-9_.-]`` replaced by ``_``."""
    return str(_fn("file_name")(tenant, name))


def missing_features(features, flags=None) -> str:
    """The LLVM `features` whose cpuinfo flag `flags` (default: this host's) lacks, as the
    core's refusal names them ("['avx2']"; "" when none: rule cpu-features)."""
    return str(_fn("missing_features")(list(features), None if flags is None else list(flags)))


def input_checker(tenant: str, inputs: list[dict]):
    """The core's check of one call's inputs to `tenant` (`inputs`: its signature's inputs,
    as the manifest writes them), parsed once: a function of per-input records (dtype name,
    data address or 0, ndim, dims...) that returns None, or the refusal's message."""
    return _fn("input_checker")(tenant, json.dumps(inputs))


def shared_checker(groups: list):
    """The core's check that the tenants sharing a run_all input give it one value
    (`groups`: run_all's parameters, each the [tenant, input] uses it serves), parsed once:
    a function of (data address, byte count) per use of each group of several uses, in
    order, that returns None, or the refusal's message."""
    return _fn("shared_checker")(json.dumps([[list(u) for u in g] for g in groups]))
