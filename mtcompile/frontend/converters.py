"""Converters of ours for core ATen ops that TVM's torch.export importer lacks or converts
with other results than PyTorch's (their entries replace TVM's).

Each maps an op name (``"op.overload"``, as the importer's table keys it) to a function
``(node, importer) -> relax.Expr`` and goes in through the importer's
``custom_convert_map``. Every converter is tested against PyTorch (tests/test_frontends.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _torch_dtype(node) -> str | None:
    """The dtype of `node`'s PyTorch output (``meta["val"]``), as TVM names it, or None."""
    val = node.meta.get("val")
    return str(val.dtype).removeprefix("torch.") if hasattr(val, "dtype") else None


def _scan(relax_op: Callable) -> Callable:
    """A converter of ``cumsum.default`` / ``cumprod.default`` that keeps PyTorch's type
    promotion. TVM's own passes ``dtype=None`` unless the call names one, and Relax then
    scans in the input's dtype, while PyTorch accumulates bool and integer inputs in
    int64: transformers' ``(position_diff != 1).cumsum(-1)`` (every decoder's packed
    sequence mask) became a bool scan, an add of bools that TVM's LLVM codegen refuses
    (``CreateAdd``: ``t.MatchesCode(kDLFloat)``), and an int32 ``cumsum`` an int32 one (a
    different dtype than PyTorch's, and a sum that can overflow)."""

    def convert(node, importer):
        x = importer.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dtype = node.kwargs.get("dtype")
        if dtype is not None:
            dtype = importer._convert_data_type(str(dtype), importer.env)
        else:  # PyTorch's result dtype (int64 for bool and integer inputs)
            dtype = _torch_dtype(node)
            if dtype is None:  # no recorded value: PyTorch's rule
                src = str(x.ty.dtype)
                dtype = "int64" if src == "bool" or src.startswith(("int", "uint")) else src
        return importer.block_builder.emit(relax_op(x, dim, dtype))

    return convert


def _static(extent) -> bool:
    from tvm import tirx

    return isinstance(extent, int | tirx.IntImm)


def _wrapped(importer, idx, extent):
    """`idx` (an integer index into an axis of `extent`) with PyTorch's negative indices
    wrapped: ``where(less(i, 0), add(i, extent), i)``, the form `index_ranges` reads back
    (a symbolic extent is added as a 1-element tensor of the call's extent)."""
    from tvm import relax

    bb, dtype = importer.block_builder, str(idx.ty.dtype)
    if _static(extent):
        n = relax.const(int(extent), dtype)
    else:
        n = bb.emit(relax.op.shape_to_tensor(relax.ShapeExpr([extent])))
        n = n if dtype == "int64" else bb.emit(relax.op.astype(n, dtype))
    neg = bb.emit(relax.op.less(idx, relax.const(0, dtype)))
    return bb.emit(relax.op.where(neg, bb.emit(relax.op.add(idx, n)), idx))


def _checked(importer, idx, extent, scale: int = 1):
    """``take(arange(extent) * scale, wrapped idx)``: `idx` times `scale`, read through a
    gather that lowering bounds-checks, so an index out of range is an error naming the
    tenant and input, never a read or write past the tensor."""
    from tvm import relax

    bb = importer.block_builder
    idx = _wrapped(importer, idx, extent)
    if _static(extent):
        table = relax.const(np.arange(int(extent), dtype="int64") * scale, "int64")
    else:  # a symbolic extent: the kernel checks at the call's extent
        table = bb.emit(
            relax.op.arange(
                relax.prim_value(0), relax.prim_value(extent), relax.prim_value(1), "int64"
            )
        )
    return bb.emit(relax.op.take(table, idx, axis=0))


def _with_indices(importer, node, method: str, checked: dict):
    """TVM's own converter `method` for `node`, its index nodes read as `checked`."""
    env = dict(importer.env)
    try:
        importer.env.update(checked)
        return getattr(importer, method)(node)
    finally:
        importer.env = env


def _index_tensor(node, importer):
    """``data[i0, i1, ...]`` (``index.Tensor``) with every index checked and PyTorch's
    result layout. TVM's converter emits ``index_tensor``, whose kernel reads at the given
    indices unchecked (``w[i, j]`` with j past the row's end read the next row), and for
    indices separated by a slice (``w[i, :, j]``) gave the wrong shape. Here the indexed
    axes (static extents) are moved to the front and flattened, read by one ``take`` at
    ``sum_k i_k * stride_k`` (each term a checked gather, `_checked`), and the broadcast
    index dims go where PyTorch puts them: in place of adjacent indexed axes, else first.
    One index is a ``take`` (checked by lowering), with the negative-index wrap only."""
    from tvm import relax

    data = importer.env[node.args[0]]
    shape = list(data.ty.shape)
    used = [(k, importer.env[i]) for k, i in enumerate(node.args[1]) if i is not None]
    if any(str(v.ty.dtype) == "bool" for _, v in used):  # masks: TVM's converter decides
        return importer._index_tensor(node)
    bb = importer.block_builder
    if len(used) == 1:
        k, idx = used[0]
        return bb.emit(relax.op.take(data, _wrapped(importer, idx, shape[k]), axis=k))
    axes = [k for k, _ in used]
    if not all(_static(shape[k]) for k in axes):
        if axes != list(range(axes[0], axes[0] + len(axes))):
            raise ValueError(
                f"index.Tensor: indices at axes {axes} of a tensor of shape {shape}: indices "
                "separated by a slice over an axis of dynamic extent are not supported"
            )
        checked = {
            i: _checked(importer, importer.env[i], shape[k])
            for k, i in enumerate(node.args[1])
            if i is not None
        }
        return _with_indices(importer, node, "_index_tensor", checked)
    return _flat_gather(importer, data, used)


def _flat_gather(importer, data, used: list):
    """``data`` indexed by `used` ((axis, index) pairs, static extents): the indexed axes
    moved to the front and flattened, read by one ``take`` at ``sum_k i_k * stride_k`` (each
    term a checked gather), the index dims put where PyTorch puts them."""
    from tvm import relax

    bb, shape, axes = importer.block_builder, list(data.ty.shape), [k for k, _ in used]
    extents = [int(shape[k]) for k in axes]
    flat = None
    for j, (_, idx) in enumerate(used):
        off = _checked(importer, idx, extents[j], int(np.prod(extents[j + 1 :], dtype=np.int64)))
        flat = off if flat is None else bb.emit(relax.op.add(flat, off))
    rest = [a for a in range(len(shape)) if a not in axes]
    x = (
        data
        if axes + rest == list(range(len(shape)))
        else bb.emit(relax.op.permute_dims(data, axes + rest))
    )
    x = bb.emit(relax.op.reshape(x, [int(np.prod(extents)), *(shape[a] for a in rest)]))
    out = bb.emit(relax.op.take(x, flat, axis=0))  # broadcast index dims, then `rest`
    nb, p0 = flat.ty.ndim, axes[0]
    if p0 == 0 or axes != list(range(p0, p0 + len(axes))):
        return out
    order = [*range(nb, nb + p0), *range(nb), *range(nb + p0, nb + len(rest))]
    return bb.emit(relax.op.permute_dims(out, order))


def _put_layout(axes: list[int], ndim: int, rb: int) -> tuple[int, dict[int, int]]:
    """Where PyTorch's indexing puts things in its result: (the first position of the `rb`
    broadcast index dims, each non-indexed axis's position). Adjacent indexed axes leave
    the index dims in their place; indexed axes separated by a slice put them first."""
    adjacent = axes == list(range(axes[0], axes[0] + len(axes)))
    p0 = axes[0] if adjacent else 0
    others = [a for a in range(ndim) if a not in axes]
    return p0, {a: j if adjacent and a < p0 else j + rb for j, a in enumerate(others)}


def _index_put(node, importer):
    """``index_put`` (``y[i] = v``, ``index_add``, ``index_copy``, ``index_fill``) with every
    index checked (`_checked`) and the write spelled out in full: one index tensor per axis
    (an ``arange`` for an axis not indexed), each shaped to its place in PyTorch's indexing
    layout (`_put_layout`), and the values broadcast to that shape. TVM's ``index_put``
    kernel wrote at the given indices unchecked (past the tensor: a crash), took only one
    index per axis, and read values of a smaller shape than the indices past their end."""
    from tvm import relax

    data, bb = importer.env[node.args[0]], importer.block_builder
    shape, given = list(data.ty.shape), list(node.args[1])
    if any(i is not None and str(importer.env[i].ty.dtype) == "bool" for i in given):
        return importer._index_put(node)  # masks: TVM's converter decides
    given += [None] * (len(shape) - len(given))
    axes = [a for a, i in enumerate(given) if i is not None]
    idx = {a: _checked(importer, importer.env[given[a]], shape[a]) for a in axes}
    rb = max(v.ty.ndim for v in idx.values())
    p0, pos = _put_layout(axes, len(shape), rb)
    rank = len(shape) - len(axes) + rb
    full, out_shape = [], [1] * rank
    for a in range(len(shape)):
        dims = [1] * rank
        if a in idx:
            v = idx[a]
            first = p0 + rb - v.ty.ndim  # right-aligned in the broadcast dims
            dims[first : first + v.ty.ndim] = list(v.ty.shape)
        else:
            one = relax.prim_value(1)
            v = relax.op.arange(relax.prim_value(0), relax.prim_value(shape[a]), one, "int64")
            dims[pos[a]] = shape[a]
        full.append(bb.emit(relax.op.reshape(v, dims)))
        out_shape = [d if o == 1 else o for o, d in zip(out_shape, dims, strict=True)]
    values = bb.emit(relax.op.broadcast_to(importer.env[node.args[2]], out_shape))
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    return bb.emit(relax.op.index_put(data, relax.Tuple(full), values, bool(accumulate)))


def _converters() -> dict[str, Callable]:
    from tvm import relax

    return {
        "cumsum.default": _scan(relax.op.cumsum),
        "cumprod.default": _scan(relax.op.cumprod),
        "index.Tensor": _index_tensor,
        "index_put.default": _index_put,
        "index_put_.default": _index_put,
    }


CONVERTERS: dict[str, Callable] = _converters()
