"""Our legalization of ``relax.take`` in TVM's "fast" mode: the same kernel as TVM's
(`topi.take(mode="fast")`, checked structurally equal), without TVM's build-time warning
that fast mode "segfaults when there are out-of-bounds indices". mtcompile's gathers are
bounds-checked, at run time on inputs (`mtcompile.analysis.index_ranges`) or in a kernel
before the gather (`lowering`'s ``check_index``), so the warning only misleads users.
"""

from __future__ import annotations

import tvm
from tvm import te, topi

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


def register() -> None:
    """Make `_take` TVM's legalization of ``relax.take`` in this process (idempotent; it
    replaces TVM's own registration, level 11 above TVM's default 10)."""
    global _registered
    if not _registered:
        tvm.ir.register_op_attr("relax.take", "FLegalize", _take, level=11)
        _registered = True
