"""Our legalizations of three kinds of ops, in place of TVM's (registered by `register`: by
`mtcompile.compile`, and by the import's constant folding, before any TVM pass legalizes):

- ``relax.take`` in TVM's "fast" mode: the same kernel as TVM's (`topi.take(mode="fast")`,
  checked structurally equal), without TVM's build-time warning that fast mode "segfaults
  when there are out-of-bounds indices". mtcompile's gathers are bounds-checked, at run time
  on inputs (`mtcompile.analysis.index_ranges`) or in a kernel before the gather
  (`lowering`'s ``check_index``), so the warning only misleads users.
- integer division and remainder: TVM's kernels divide with the CPU's integer divide, which
  stops the process (SIGFPE) on a divisor of 0 and on the most negative value divided by
  -1. A divisor of 0 is refused before (`lowering`'s ``check_divisor``); here the divisor is
  1 where it is 0 (never reached: a second guard) and where the most negative value meets
  -1, which gives PyTorch's results there (``MIN // -1 == MIN``, ``MIN % -1 == 0``).
- ``full`` with an infinite or NaN fill (`_full`).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx, topi
from tvm.ir.expr import GenericConst
from tvm.relax import ShapeExpr
from tvm.relax.transform.legalize_ops.binary import _binary

_registered = False


def _fast_take(data, indices, axis: int):
    nd = len(indices.shape)
    shape = [*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]]

    def element(*i):
        return data[(*i[:axis], indices[i[axis : axis + nd]], *i[axis + nd :])]

    return te.compute(shape, element, name="T_take", tag="injective")


def _take(bb, call):
    axis = call.attrs.axis
    if str(call.attrs.mode) != "fast" or axis is None:
        return bb.call_te(topi.take, call.args[0], call.args[1], axis, mode=call.attrs.mode)
    ndim = len(call.args[0].ty.shape)
    return bb.call_te(_fast_take, call.args[0], call.args[1], int(axis) % ndim)


_DIVISIONS = {
    "relax.divide": topi.divide,
    "relax.floor_divide": topi.floor_divide,
    "relax.mod": topi.mod,
    "relax.floor_mod": topi.floor_mod,
}


def _never_trapping(te_op, dtype: str):
    """`te_op(a, b)` with the divisor 1 where the CPU's divide would trap (`b` 0, or `a` the
    most negative value and `b` -1); `a` or `b` may be a constant scalar. The masks are
    integer arithmetic, no bool values: TVM folds a compare of a constant operand into a bool
    vector constant its LLVM codegen refuses ("IntImm can only take scalar, but boolx8")."""
    low = tirx.min_value(dtype)
    signed = not dtype.startswith("uint")
    bits = tvm.DataType(dtype).bits

    def nonzero(x):  # 1 where x != 0, else 0: the sign bit of x | -x
        return topi.bitwise_and(
            topi.right_shift(topi.bitwise_or(x, topi.subtract(0, x)), bits - 1), 1
        )

    def is_low(a):  # 1 where a is the most negative value, else 0
        return topi.subtract(1, nonzero(topi.bitwise_xor(a, low)))

    def divide(a, b):
        if not isinstance(b, te.Tensor):  # a constant divisor: 0 is refused at build time
            if not signed or int(b) != -1:
                return te_op(a, b)
            return te_op(a, topi.add(topi.multiply(is_low(a), 2), -1))  # 1 where a is MIN
        fix = topi.subtract(1, nonzero(b))  # 1 where b is 0
        if signed and isinstance(a, te.Tensor):  # + 1 where a is MIN and b is -1
            fix = topi.add(fix, topi.multiply(is_low(a), topi.subtract(1, nonzero(topi.add(b, 1)))))
        return te_op(a, topi.add(b, topi.multiply(fix, topi.subtract(1, b))))

    return divide


def _division(te_op):
    def legalize(bb, call):
        dtype = str(call.ty.dtype)
        if not dtype.startswith(("int", "uint")):
            return _binary(te_op)(bb, call)
        return _binary(_never_trapping(te_op, dtype))(bb, call)

    return legalize


def _full(original):
    """TVM's ``full``/``full_like`` legalization (`original`), and an infinite or NaN fill
    too: TVM hands `topi.full` the dtype as a type object, on which its float check fails
    ("argument of type 'PrimType' is not iterable": ``torch.full(..., float("-inf"))``, a
    causal mask, did not compile)."""

    def legalize(bb, call):
        fill = call.args[1]
        value = fill.value.numpy() if isinstance(fill, GenericConst) else None
        like = call.op.name == "relax.full_like"
        shape = call.args[0].ty.shape if like else call.args[0]
        if value is None or value.ndim or np.isfinite(value) or not isinstance(shape, ShapeExpr):
            return original(bb, call)
        dtype = str(call.ty.dtype)
        return bb.call_te(
            topi.full, list(shape.values), dtype, float(value), primfunc_name_hint="full"
        )

    return legalize


def register() -> None:
    """Make `_take`, `_division` and `_full` TVM's legalizations in this process
    (idempotent; they replace TVM's own registrations, level 11 above TVM's default 10)."""
    global _registered
    if not _registered:
        tvm.ir.register_op_attr("relax.take", "FLegalize", _take, level=11)
        for op in ("relax.full", "relax.full_like"):
            original = tvm.ir.Op.get(op).get_attr("FLegalize")
            tvm.ir.register_op_attr(op, "FLegalize", _full(original), level=11)
        for op, te_op in _DIVISIONS.items():
            tvm.ir.register_op_attr(op, "FLegalize", _division(te_op), level=11)
        _registered = True
