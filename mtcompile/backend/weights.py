"""Weights out of the executable: each entry function's large constants become trailing
parameters, and their bytes one table the bundle's library carries as raw, aligned data
(`mtcompile.runtime.weights`), which the runtime maps and passes on each call.

Why: TVM serializes an executable's constants into a blob inside the library, and loading it
copies them more than once (the mapped file, the blob's bytes, the unpacked tensors): a
process loading 120 MB of weights peaked at 690 MiB. Mapped in place, each weight is
resident once, in pages the kernel can share and drop, and nothing is copied on load.

Run after TVM's constant folding (`kernels.prepare`): a computation on constants left
behind would run on every call once its inputs are parameters."""

from __future__ import annotations

import hashlib

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst

from mtcompile.abi import MANIFEST_FN
from mtcompile.ir.graph import WEIGHT_MIN_BYTES

# smaller constants (scalars of an add, shapes) stay in the executable: TVM may fold them
# into kernels, and their bytes do not matter
MIN_BYTES = WEIGHT_MIN_BYTES


def _tensor_const(e) -> bool:
    """A constant holding a tensor (TVM 0.27 has no relax.Constant: IntImm is one too)."""
    return isinstance(e, GenericConst) and hasattr(e.value, "shape")


def _nbytes(c: GenericConst) -> int:
    t = c.value
    return int(np.prod(t.shape, dtype=np.int64)) * tvm.runtime.DataType(str(t.dtype)).bits // 8


@relax.expr_functor.mutator
class _ToParams(relax.PyExprMutator):
    """Constants of `params` (by object) -> their parameter var."""

    def __init__(self, params: dict[int, relax.Var]):
        super().__init__()
        self.params = params

    def visit_generic_const_(self, op):
        return self.params.get(hash(op), op)


def lift(
    mod: tvm.IRModule, min_bytes: int = MIN_BYTES
) -> tuple[tvm.IRModule, list[np.ndarray], dict[str, list[int]]]:
    """(module, weights, args): every non-primitive Relax function of `mod` (the embedded
    manifest's aside) takes its constants of at least `min_bytes` as trailing parameters, in
    first-use order; `weights` holds each distinct one once (equal bytes, shape and dtype:
    one entry), and `args[function]` the indices into `weights` of its trailing parameters.
    """
    weights: list[np.ndarray] = []
    by_content: dict[tuple, int] = {}
    args: dict[str, list[int]] = {}
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, func in mod.functions_items():
        name = gv.name_hint
        if (
            not isinstance(func, relax.Function)
            or name == MANIFEST_FN
            or (func.attrs is not None and "Primitive" in func.attrs)
        ):
            continue
        found: dict[int, GenericConst] = {}

        def visit(e, found=found):
            if _tensor_const(e) and hash(e) not in found and _nbytes(e) >= min_bytes:
                found[hash(e)] = e

        relax.analysis.post_order_visit(func.body, visit)
        if not found:
            continue
        params: dict[int, relax.Var] = {}
        idx: list[int] = []
        for h, c in found.items():
            arr = c.value.numpy()
            key = (arr.dtype.str, arr.shape, hashlib.sha256(arr.tobytes()).digest())
            if key not in by_content:
                by_content[key] = len(weights)
                weights.append(arr)
            idx.append(by_content[key])
            params[h] = relax.Var(f"mtcompile_w{by_content[key]}", c.ty)
        body = _ToParams(params).visit_expr(func.body)
        new = relax.Function(
            [*func.params, *params.values()], body, func.ret_ty, func.is_pure, func.attrs, func.span
        )
        out[gv] = new
        args[name] = idx
    return out, weights, args
