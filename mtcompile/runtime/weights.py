"""A bundle's weights: one table of raw tensors the library carries in its read-only data,
page-aligned under the symbol `SYMBOL`, each tensor at a 64-byte aligned offset (the
manifest's `WeightsInfo`). A loaded bundle maps them where the library lies: no copy, each
weight resident once and only once touched. Entry functions take theirs as trailing
parameters (`mtcompile.backend.weights`): `Weights.args` gives them per function."""

from __future__ import annotations

import contextlib
import ctypes
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from mtcompile.errors import ArtifactError
from mtcompile.runtime import contract, tvmrt
from mtcompile.runtime.manifest import WeightsInfo, weights_from_json

SYMBOL = "mtcompile_weights"
ALIGN = contract.ALIGN


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def info(arrays: list[np.ndarray], args: dict[str, list[int]]) -> WeightsInfo:
    """The table of `arrays` laid out one after the other at `ALIGN`-byte offsets."""
    rows, offset = [], 0
    for a in arrays:
        rows.append((offset, tuple(int(d) for d in a.shape), str(a.dtype)))
        offset += -(-a.nbytes // ALIGN) * ALIGN
    return WeightsInfo(
        symbol=SYMBOL,
        bytes=offset,
        tensors=tuple(rows),
        args={f: tuple(i) for f, i in args.items()},
    )


def table_json(table: WeightsInfo) -> str:
    """The table as the library carries it (`contract.TABLE_SYMBOL`): its manifest JSON."""
    return json.dumps(table.to_dict(), sort_keys=True, separators=(",", ":"))


def write_object(arrays: list[np.ndarray], table: WeightsInfo, workdir: Path) -> Path:
    """An object file defining `SYMBOL` over the bytes of `arrays` as `table` lays them out,
    `contract.END_SYMBOL` at its end and `contract.TABLE_SYMBOL` (the table itself), for the
    library's link: the library hash then covers the table (its contents depend on the
    bytes only: no path, no time)."""
    blob = workdir / "weights.bin"
    with open(blob, "wb") as f:
        for a, (offset, _, _) in zip(arrays, table.tensors, strict=True):
            f.seek(offset)
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(max(table.bytes, 1))
    (workdir / "table.json").write_bytes(table_json(table).encode() + b"\0")
    end, tab = contract.END_SYMBOL, contract.TABLE_SYMBOL
    asm = workdir / "weights.s"
    asm.write_text(
        f'\t.section .rodata.{SYMBOL},"a"\n\t.balign 4096\n\t.globl {SYMBOL}\n'
        f'\t.type {SYMBOL}, @object\n{SYMBOL}:\n\t.incbin "weights.bin"\n'
        f"\t.size {SYMBOL}, .-{SYMBOL}\n\t.globl {end}\n{end}:\n"
        f"\t.globl {tab}\n\t.type {tab}, @object\n{tab}:\n"
        f'\t.incbin "table.json"\n\t.size {tab}, .-{tab}\n'
        '\t.section .note.GNU-stack,"",@progbits\n'
    )
    obj = workdir / "weights.o"
    done = subprocess.run(
        ["gcc", "-c", asm.name, "-o", obj.name], cwd=workdir, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise ArtifactError(f"cannot assemble the bundle's weights: {done.stderr.strip()}")
    blob.unlink()
    return obj


@contextlib.contextmanager
def export_addon(arrays: list[np.ndarray], table: WeightsInfo | None):
    """The object files the library's link adds for the weights (none when the bundle has
    none), alive while the context lasts."""
    if table is None or not table.tensors:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="mtcompile-w-") as tmp:
        yield [str(write_object(arrays, table, Path(tmp)))]


def arrays(lib: contract.LibraryWeights) -> list[np.ndarray]:
    """The weights of a loaded library as arrays over its mapped pages (read-only in fact:
    nothing writes a weight), as the table it carries lays them out; the core checked the
    table against the symbol (`contract.library_weights`)."""
    if not lib.table:
        return []
    table = weights_from_json(lib.table, "the library")
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * max(lib.size, 1)).from_address(lib.base))
    out = []
    for offset, shape, dtype in table.tensors:
        n = int(np.prod(shape, dtype=np.int64)) * contract.WEIGHT_DTYPES[dtype]
        out.append(raw[offset : offset + n].view(_dtype(dtype)).reshape(shape))
    return out


class Weights:
    """A bundle's weights as arrays, and as TVM tensors per device (made on first use and
    shared by every thread: the VM never writes a parameter)."""

    def __init__(self, arrays: list[np.ndarray], table: WeightsInfo | None):
        self.arrays, self.table = arrays, table
        self._tensors: dict[str, list] = {}
        self._args: dict[tuple[str, str], list] = {}

    def fault_in(self, function: str | None = None) -> int:
        """Read one byte of every page of the weights `function` takes (all of them when
        None), so that the first call finds them resident instead of faulting them in from
        the library file; returns the bytes touched."""
        if self.table is None:
            return 0
        which = range(len(self.arrays)) if function is None else self.table.args.get(function, ())
        touched = checksum = 0
        for i in which:
            flat = self.arrays[i].reshape(-1).view(np.uint8)
            checksum += int(flat[::4096].sum())  # one read per page faults it in
            touched += flat.size
        return touched

    def args(self, function: str, dev) -> list:
        """The trailing arguments `function` takes on `dev` (none without a table)."""
        key = (function, str(dev))
        got = self._args.get(key)
        if got is None:
            if self.table is None or function not in self.table.args:
                got = []
            else:
                tensors = self._tensors.get(str(dev))
                if tensors is None:
                    tensors = self._tensors[str(dev)] = [tvmrt.tensor(a, dev) for a in self.arrays]
                got = [tensors[i] for i in self.table.args[function]]
            self._args[key] = got
        return got
