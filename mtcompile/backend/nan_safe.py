"""Float ops whose TVM legalization drops NaN, as TE computations that keep it (as PyTorch and
onnxruntime do): relu, clip, maximum, minimum, max and min reductions, max-pooling.

TVM computes ``relu`` as ``max(x, 0)`` and pools with ``max``, and LLVM's ordered compares
make ``max(NaN, 0)`` 0; written as selects on a compare that is false for NaN (``x < 0 ?
0 : x``), NaN passes through and the code still vectorizes (one compare, one select).
`emit` returns None for anything else: lowering then emits the op as it is.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, tirx

_REDUCTIONS = {"relax.max": True, "relax.min": False}  # -> bigger
_POOLS = {
    "relax.nn.max_pool1d": "NCW",
    "relax.nn.max_pool2d": "NCHW",
    "relax.nn.max_pool3d": "NCDHW",
}
OPS = frozenset(
    {"relax.nn.relu", "relax.clip", "relax.maximum", "relax.minimum", *_REDUCTIONS, *_POOLS}
)


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _relu(x):
    zero = tirx.const(0, x.dtype)
    return te.compute(x.shape, lambda *i: tirx.Select(x(*i) < zero, zero, x(*i)), name="relu")


def _clip(x, lo, hi):
    lo, hi = tirx.Cast(x.dtype, lo), tirx.Cast(x.dtype, hi)

    def f(*i):
        v = x(*i)
        return tirx.Select(v < lo, lo, tirx.Select(hi < v, hi, v))

    return te.compute(x.shape, f, name="clip")


def _static(d) -> int | None:
    """A dimension's value, None when symbolic (dynamic batch: never broadcast from 1)."""
    return int(d) if isinstance(d, int | tirx.IntImm) else None


def _broadcast(t, shape):
    """An accessor of `t` at the indices of `shape` (NumPy broadcasting from the right)."""
    rank, dims = len(shape), [_static(d) for d in t.shape]

    def at(*i):
        return t(
            *(
                0
                if d == 1 and _static(shape[rank - len(dims) + k]) != 1
                else i[rank - len(dims) + k]
                for k, d in enumerate(dims)
            )
        )

    return at


def _extreme(a, b, shape, bigger: bool):
    """maximum (`bigger`) or minimum of a and b: NaN wins, as in torch.maximum."""
    fa, fb = _broadcast(a, shape), _broadcast(b, shape)

    def f(*i):
        x, y = fa(*i), fb(*i)
        wins = x > y if bigger else x < y
        return tirx.Select(tirx.any(wins, tirx.isnan(x)), x, y)

    return te.compute(shape, f, name="maximum" if bigger else "minimum")


def _nan_max(a, b):
    return tirx.Select(tirx.any(a > b, tirx.isnan(a)), a, b)


def _nan_min(a, b):
    return tirx.Select(tirx.any(a < b, tirx.isnan(a)), a, b)


_NAN_MAX = te.comm_reducer(_nan_max, lambda t: tirx.const(-math.inf, t), name="nan_max")
_NAN_MIN = te.comm_reducer(_nan_min, lambda t: tirx.const(math.inf, t), name="nan_min")


def _reduce(x, axes, keepdims: bool, bigger: bool):
    """max (`bigger`) or min of `x` over `axes`: NaN wins, as in torch.amax."""
    rank = len(x.shape)
    axes = sorted({a % rank for a in axes} if axes is not None else range(rank))
    r = {a: te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes}
    shape = [1 if a in r else x.shape[a] for a in range(rank) if keepdims or a not in r]
    reducer = _NAN_MAX if bigger else _NAN_MIN

    def f(*o):
        idx, j = [], 0
        for a in range(rank):
            if a in r:
                idx.append(r[a])
                j += keepdims  # the kept axis of extent 1
            else:
                idx.append(o[j])
                j += 1
        return reducer(x(*idx), axis=list(r.values()))

    return te.compute(shape, f, name="max" if bigger else "min")


def _max_pool(x, shape, kernel, strides, dilation, pad_before):
    """Max-pooling over the trailing spatial axes of `x` (N, C, *spatial) into `shape`;
    padding and positions past the input (ceil mode) count as -inf, NaN wins."""
    spatial = [int(d) for d in x.shape[2:]]
    axes = [te.reduce_axis((0, k), name=f"r{j}") for j, k in enumerate(kernel)]

    def f(n, c, *o):
        pos = [o[j] * strides[j] + axes[j] * dilation[j] - pad_before[j] for j in range(len(o))]
        inside = tirx.all(*(tirx.all(p >= 0, p < spatial[j]) for j, p in enumerate(pos)))
        value = tirx.if_then_else(inside, x(n, c, *pos), tirx.const(-math.inf, x.dtype))
        return _NAN_MAX(value, axis=axes)

    return te.compute(shape, f, name="max_pool")


def emit(top: relax.BlockBuilder, op: str, args: list, attrs, out_shape, dtype: str):
    """The call of a NaN-keeping kernel for `op` on Relax `args` (its PrimFunc added to
    `top`), or None when `op` and its dtype need none."""
    if op not in OPS or not _is_float(dtype):
        return None
    shape = [getattr(d, "obj", d) for d in out_shape]  # a symbolic dim: its TVM expression
    if op == "relax.nn.relu":
        return top.call_te(_relu, args[0], primfunc_name_hint="relu_nan")
    if op == "relax.clip":
        if not all(tvm.ir.is_prim_expr(a) for a in args[1:]):
            return None
        return top.call_te(_clip, args[0], args[1], args[2], primfunc_name_hint="clip_nan")
    if op in ("relax.maximum", "relax.minimum"):
        return top.call_te(
            _extreme,
            args[0],
            args[1],
            shape,
            op == "relax.maximum",
            primfunc_name_hint=op.removeprefix("relax.") + "_nan",
        )
    if op in _REDUCTIONS:
        axes = None if attrs.axis is None else [int(a) for a in attrs.axis]
        return top.call_te(
            _reduce,
            args[0],
            axes,
            bool(attrs.keepdims),
            _REDUCTIONS[op],
            primfunc_name_hint=op.removeprefix("relax.") + "_nan",
        )
    layout = _POOLS[op]
    if str(attrs.layout) != layout or str(attrs.out_layout) != layout:
        return None  # other layouts: TVM's pool (NaN may be dropped)
    nd = len(layout) - 2
    pad = [int(p) for p in attrs.padding][:nd]
    return top.call_te(
        _max_pool,
        args[0],
        shape,
        [int(k) for k in attrs.pool_size],
        [int(s) for s in attrs.strides],
        [int(d) for d in attrs.dilation],
        pad,
        primfunc_name_hint="max_pool_nan",
    )
