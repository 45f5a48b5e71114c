"""Value ranges of inputs that index a table: TVM's fast-mode ``take`` reads out of bounds on
a bad index, so the runtime checks such inputs against these ranges before a call."""

from __future__ import annotations

from mtcompile.ir.graph import INPUT, ConstRef, Graph, Ref, TensorTy

# Ops through which an index value keeps its meaning (casts, reshapes, the negative-index
# wrap that ONNX Gather imports as where(less(i, 0), i + n, i)).
_INDEX_PATH_OPS = {"relax.astype", "relax.reshape", "relax.expand_dims", "relax.squeeze",
                   "relax.permute_dims", "relax.broadcast_to", "relax.where", "relax.less",
                   "relax.add"}


def input_index_ranges(graph: Graph) -> dict[str, tuple[int, int]]:
    """Input node -> the [low, high) range of valid values, for inputs that index a table
    through a fast-mode ``take``: [0, rows), or [-rows, rows) where the import wraps
    negative indices (ONNX Gather).

    TVM's fast-mode take reads out of bounds (and may crash the process) on a bad index,
    so the runtime checks such inputs before calling into the executable.
    """
    ranges: dict[str, tuple[int, int]] = {}
    for n in graph.nodes:
        if n.op != "relax.take" or n.attrs is None or str(n.attrs.obj.mode) != "fast":
            continue
        table, idx = n.args
        rows = _rows(graph, table, int(n.attrs.obj.axis) if n.attrs.obj.axis is not None else 0)
        src = _index_source(graph, idx)
        if rows is None or src is None:
            continue
        name, wraps = src
        lo, hi = (-rows if wraps else 0), rows
        if name in ranges:  # several tables: the tightest range serves them all
            lo, hi = max(lo, ranges[name][0]), min(hi, ranges[name][1])
        ranges[name] = (lo, hi)
    return ranges


def _rows(graph: Graph, table, axis: int) -> int | None:
    if isinstance(table, ConstRef):
        shape = graph.constants[table.key].shape
    elif isinstance(table, Ref) and isinstance(graph.node(table.name).ty, TensorTy):
        shape = graph.node(table.name).ty.shape
    else:
        return None
    return int(shape[axis]) if shape else None


def _index_source(graph: Graph, idx) -> tuple[str, bool] | None:
    """The one input node an index value is computed from, through index-keeping ops, and
    whether negative values are wrapped on the way (``where``)."""
    sources: set[str] = set()
    wraps = False
    stack = [idx]
    while stack:
        a = stack.pop()
        if not isinstance(a, Ref):
            continue  # constants (the n of the wrap) are fine
        node = graph.node(a.name)
        if node.op == INPUT:
            sources.add(node.name)
        elif node.op in _INDEX_PATH_OPS:
            wraps |= node.op == "relax.where"
            stack.extend(node.args)
        else:
            return None
    return (sources.pop(), wraps) if len(sources) == 1 else None
