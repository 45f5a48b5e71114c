"""The artifact contract's rules that both runtimes enforce: this module for the Python
runtime, the section "the artifact contract" of ``mtcompile/driver/src/run_bundle.cc`` for
``mtcompile-run``. The two name the same rules (`RULES`) and say the same words.

A bundle's weights table (``manifest.json``'s ``weights``) is bound to the library: the
library carries its own copy (symbol `TABLE_SYMBOL`, the table's JSON) and the end of its
weights (`END_SYMBOL`), so the library hash covers them. Every table, the manifest's and the
library's, is checked against the weights symbol's size before a byte of it is viewed."""

from __future__ import annotations

import re

import numpy as np

from mtcompile.errors import ArtifactError
from mtcompile.runtime.manifest import WeightsInfo

TABLE_SYMBOL = "mtcompile_weights_table"  # NUL-terminated JSON of the library's own table
END_SYMBOL = "mtcompile_weights_end"  # one past the weights symbol's last byte
ALIGN = 64
# a weight's dtype -> bytes per element (the driver's kWeightDTypes holds the same)
WEIGHT_DTYPES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8,
                 "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}

# The rules, by name; run_bundle.cc names the same ones.
RULES = {
    "tvm-version": "the bundle was built with this TVM (its executable format is not stable)",
    "cpu-features": "the host CPU has the instruction-set features the kernels were built for",
    "library-hash": "the library's sha256 is manifest.json's library_sha256 (before dlopen)",
    "library-name": "manifest.json's library is a plain file name in the bundle directory",
    "library-elf": "the library's ELF headers and segments lie inside the file",
    "signature": "with a verify key, the HMAC of the manifest and the library matches",
    "embedded-manifest": "the manifest the library embeds equals manifest.json (less "
                         "library_sha256, memory, weights, bundle_signature)",
    "weights-same": "manifest.json's weights table equals the one the library carries",
    "weights-bytes": "the table's bytes fit the library's weights symbol",
    "weight-dtype": "each weight's dtype is one of WEIGHT_DTYPES",
    "weight-offset": "each weight's offset is >= 0 and a multiple of 64",
    "weight-shape": "each weight's dims are >= 0",
    "weight-extent": "offset + prod(shape) * itemsize ends within the weights symbol",
    "run-all-inputs": "run_all_inputs names each tenant input exactly once",
    "index-range": "an index input's values lie in its index_range [lo, hi)",
    "file-name": "an input or output file is <tenant>.<name>.npy, each character of the "
                 "name outside [A-Za-z0-9_.-] replaced by '_'",
}


def _shape_text(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def check_weights(table: WeightsInfo, size: int, where) -> None:
    """Raise `ArtifactError` (naming the field, the weight, what was expected and found)
    unless every weight of `table` lies inside a weights symbol of `size` bytes."""
    sym = f"the {size} bytes of the library's weights symbol '{table.symbol}'"
    if not 0 <= table.bytes <= size:
        raise ArtifactError(f"{where}: weights.bytes: expected at most {sym}, found "
                            f"{table.bytes}")
    for i, (offset, shape, dtype) in enumerate(table.tensors):
        field = f"{where}: weights.tensors[{i}] (weight {i})"
        if dtype not in WEIGHT_DTYPES:
            raise ArtifactError(f"{field}: dtype: expected one of {', '.join(WEIGHT_DTYPES)}"
                                f", found '{dtype}'")
        if offset < 0 or offset % ALIGN:
            raise ArtifactError(f"{field}: offset: expected >= 0 and a multiple of {ALIGN}, "
                                f"found {offset}")
        if any(d < 0 for d in shape):
            raise ArtifactError(f"{field}: shape: expected dims >= 0, found "
                                f"{_shape_text(shape)}")
        end = offset + int(np.prod(shape, dtype=object)) * WEIGHT_DTYPES[dtype]
        if end > size:
            at = f"at byte {end}" if end < 1 << 62 else "beyond byte 2**62"
            raise ArtifactError(f"{field}: extent: expected {dtype}{_shape_text(shape)} at "
                                f"offset {offset} to end within {sym}, found its end {at}")


def _rows(table: WeightsInfo) -> list[tuple[str, object]]:
    """(field, value) of every field of `table`, in one order."""
    rows: list[tuple[str, object]] = [("symbol", table.symbol), ("bytes", table.bytes),
                                      ("tensors (count)", len(table.tensors))]
    for i, (offset, shape, dtype) in enumerate(table.tensors):
        rows += [(f"tensors[{i}].offset", offset), (f"tensors[{i}].shape", list(shape)),
                 (f"tensors[{i}].dtype", dtype)]
    rows.append(("args (functions)", sorted(table.args)))
    rows += [(f"args.{f}", list(table.args[f])) for f in sorted(table.args)]
    return rows


def check_same_weights(found: WeightsInfo | None, library: WeightsInfo | None, where) -> None:
    """Raise unless manifest.json's table (`found`) is the library's own (`library`),
    field for field (rule "weights-same"); a bundle without weights has neither table, or
    an empty one in the manifest."""
    if library is None or found is None:
        n, m = (len(t.tensors) if t is not None else 0 for t in (library, found))
        if n == m == 0:
            return
        raise ArtifactError(f"{where}: weights: expected {n} weights (the table the library "
                            f"carries), found {m}; the manifest was edited or comes from "
                            "another build")
    for (field, got), (_, want) in zip(_rows(found), _rows(library), strict=False):
        if got != want:
            raise ArtifactError(f"{where}: weights.{field}: expected {want} (the table the "
                                f"library carries), found {got}; the manifest was edited "
                                "or comes from another build")


def file_name(tenant: str, name: str) -> str:
    """The file of a tenant's input or output (rule "file-name"): ``<tenant>.<name>.npy``
    with every character of `name` outside ``[A-Za-z0-9_.-]`` replaced by ``_``."""
    return f"{tenant}.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.npy"
