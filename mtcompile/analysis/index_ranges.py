"""Indexed reads (gathers) and the input ranges that make them safe: the fast path of the
bounds checks. TVM's fast-mode ``take`` reads out of bounds (and may crash the process) on
a bad index, so every gather lowering emits is checked, either here or in the kernel:

- where an index is an input's values, exactly (through value-keeping ops, integer casts,
  shifts by a constant and the negative-index wrap that ONNX Gather imports as
  ``where(less(i, 0), i + n, i)``), the runtime checks that input against the range
  `input_index_ranges` gives before the call (the manifest's ``index_range``);
- every other gather gets a check in the generated code (lowering), which raises an error
  naming the tenant and the inputs the index comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtcompile.ir.graph import INPUT, ConstRef, Graph, Ref, Sym, TensorTy

# Ops whose output holds the values of their first argument (all of them, reshaped or
# repeated): an index range on the output is the same range on the input.
_VALUE_KEEPING = {
    "relax.reshape",
    "relax.expand_dims",
    "relax.squeeze",
    "relax.permute_dims",
    "relax.broadcast_to",
    "relax.flatten",
}
# Indexed reads and writes TVM does not bound: op -> (table argument, index argument,
# whether TVM wraps negative indices, so that [-extent, extent) is valid)
GATHERS = {
    "relax.take": (0, 1, False),
    "relax.gather_elements": (0, 1, False),
    "relax.scatter_elements": (0, 1, True),
}


@dataclass(frozen=True)
class IndexRead:
    """A gather: node `node` reads (or, for a scatter, writes) its table at the values of
    argument `arg`, which must lie in [`low`, `bound`) (`bound`: the table's extent along
    `axis`; `low`: 0, or -bound where TVM wraps negative indices). `inputs`: the input nodes the
    index is computed from; `source`, `valid`: the one input whose values alone decide the
    index and the range of its values that gives valid indices (None when not exact).
    A table of symbolic extent along `axis` (dynamic batch) has a `Sym` bound (and low,
    where it wraps); its reads are checked in the kernel, at the extent of the call."""

    node: str
    arg: int
    axis: int
    bound: int | Sym
    low: int | Sym
    inputs: tuple[str, ...]
    source: str | None = None
    valid: tuple[int, int] | None = None


def index_reads(graph: Graph) -> list[IndexRead]:
    """Every access of a table at computed positions in `graph` that lowering emits and
    TVM does not bound itself (`GATHERS`; ``take`` in clip or wrap mode is safe)."""
    reads = []
    for n in graph.nodes:
        if n.op not in GATHERS or n.attrs is None:
            continue
        if n.op == "relax.take" and str(n.attrs.obj.mode) != "fast":
            continue
        t, i, wraps = GATHERS[n.op]
        table, idx = n.args[t], n.args[i]
        axis = int(n.attrs.obj.axis) if n.attrs.obj.axis is not None else 0
        shape = _shape(graph, table)
        if not shape:
            continue
        if axis < 0:
            axis += len(shape)
        bound = shape[axis]
        if isinstance(bound, Sym):  # no fixed input range: the kernel checks it
            low = _negated(bound) if wraps else 0
            reads.append(IndexRead(n.name, i, axis, bound, low, _inputs_of(graph, idx)))
            continue
        bound = int(bound)
        low = -bound if wraps else 0
        exact = _exact_source(graph, idx, (low, bound))
        source, valid = exact if exact is not None else (None, None)
        reads.append(IndexRead(n.name, i, axis, bound, low, _inputs_of(graph, idx), source, valid))
    return reads


def input_index_ranges(graph: Graph) -> dict[str, tuple[int, int]]:
    """Input node -> the [low, high) range its values must lie in: the inputs some gather
    reads at exactly their values (`IndexRead.valid`; several gathers: all their ranges)."""
    ranges: dict[str, tuple[int, int]] = {}
    for r in index_reads(graph):
        if r.source is None:
            continue
        lo, hi = r.valid
        if r.source in ranges:
            lo, hi = max(lo, ranges[r.source][0]), min(hi, ranges[r.source][1])
        ranges[r.source] = (lo, hi)
    return ranges


def checked_by_inputs(read: IndexRead, ranges: dict[str, tuple[int, int]]) -> bool:
    """Whether the run-time input check with `ranges` already keeps `read` in bounds (its
    index is exactly an input's values and that input's range lies within the valid one)."""
    if read.source is None or read.source not in ranges:
        return False
    lo, hi = ranges[read.source]
    return read.valid[0] <= lo and hi <= read.valid[1]


def valid_range(read: IndexRead, always: bool) -> tuple[int, int]:
    """The [low, high) range of indices `read` accepts at every extent its table can have
    (`always`), or at some extent (else); for a table of fixed extent both are [low, bound)."""
    if always:  # the largest low, the smallest bound
        return (
            read.low if isinstance(read.low, int) else read.low.hi,
            read.bound if isinstance(read.bound, int) else read.bound.lo,
        )
    return (
        read.low if isinstance(read.low, int) else read.low.lo,
        read.bound if isinstance(read.bound, int) else read.bound.hi,
    )


def _negated(d: Sym) -> Sym:
    """-d (the low end of a wrapping index range on a table of symbolic extent d)."""
    return Sym(
        f"-{d.text}" if d.text.isidentifier() else f"-({d.text})",
        -d.hi,
        -d.lo,
        d.bounds,
        -d.obj if d.obj is not None else None,
    )


def _shape(graph: Graph, a) -> tuple[int, ...] | None:
    if isinstance(a, ConstRef):
        return tuple(graph.constants[a.key].shape)
    if isinstance(a, Ref) and isinstance(graph.node(a.name).ty, TensorTy):
        return tuple(graph.node(a.name).ty.shape)
    return None


def _inputs_of(graph: Graph, a) -> tuple[str, ...]:
    """The input nodes value `a` is computed from (in graph order)."""
    seen: set[str] = set()
    stack = [a.name] if isinstance(a, Ref) else []
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph.node(name).inputs)
    return tuple(n.name for n in graph.nodes if n.name in seen and n.op == INPUT)


def _int_scalar(graph: Graph, a) -> int | None:
    """The value of a constant integer tensor whose elements are all equal, else None."""
    if not isinstance(a, ConstRef):
        return None
    arr = graph.constants[a.key]
    if arr.size == 0 or arr.dtype.kind not in "iu" or not (arr == arr.flat[0]).all():
        return None
    return int(arr.flat[0])


def _is_int(graph: Graph, a) -> bool:
    if isinstance(a, Ref) and isinstance(graph.node(a.name).ty, TensorTy):
        return np.dtype(graph.node(a.name).ty.dtype).kind in "iu"
    return False


def _fits(dtype: str, lo: int, hi: int) -> bool:
    info = np.iinfo(np.dtype(dtype))
    return info.min <= lo and hi - 1 <= info.max


def _exact_source(graph: Graph, idx, valid: tuple[int, int]) -> tuple[str, tuple[int, int]] | None:
    """(input, range of its values) when `idx` is exactly that input's values, moved by
    the ops above: the index is in `valid` exactly when the input is in the range."""
    a = idx
    while isinstance(a, Ref):
        node = graph.node(a.name)
        lo, hi = valid
        if lo >= hi:
            return None
        if node.op == INPUT:
            return node.name, valid
        if node.op in _VALUE_KEEPING:
            a = node.args[0]
        elif node.op == "relax.astype":
            # an integer cast keeps the values of the valid range (and a value outside it
            # is refused before the cast could wrap it into the range)
            src = node.args[0]
            if not (
                _is_int(graph, src)
                and _is_int(graph, a)
                and _fits(node.ty.dtype, lo, hi)
                and _fits(graph.node(src.name).ty.dtype, lo, hi)
            ):
                return None
            a = src
        elif node.op in ("relax.add", "relax.subtract"):
            x, y = node.args
            c, other = _int_scalar(graph, y), x
            if c is None and node.op == "relax.add":
                c, other = _int_scalar(graph, x), y
            if c is None:
                return None
            c = -c if node.op == "relax.subtract" else c
            valid, a = (lo - c, hi - c), other
        elif node.op == "relax.where":
            x = _wrapped(graph, node, valid)
            if x is None:
                return None
            valid, a = (-hi, hi), x
        else:
            return None
    return None


def _wrapped(graph: Graph, node, valid: tuple[int, int]):
    """The x of ``where(less(x, 0), add(x, n), x)`` when `valid` is [0, n), else None."""
    cond, then, other = node.args
    if valid[0] != 0 or not all(isinstance(v, Ref) for v in (cond, then, other)):
        return None
    less, add = graph.node(cond.name), graph.node(then.name)
    if less.op != "relax.less" or add.op != "relax.add":
        return None
    if less.args[0] != other or _int_scalar(graph, less.args[1]) != 0:
        return None
    if add.args[0] != other or _int_scalar(graph, add.args[1]) != valid[1]:
        return None
    return other
