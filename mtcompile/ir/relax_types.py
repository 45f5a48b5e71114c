"""Our IR's view of Relax objects: Relax types -> `TensorTy`/`TupleTy`/`OtherTy`, and TVM
objects wrapped as `Opaque` (keyed by structural hash). Shared by lift, the node builder
and lowering; `mtcompile.ir.graph` itself stays free of TVM."""

from __future__ import annotations

import re

import tvm
import tvm_ffi
from tvm import relax

from mtcompile.errors import TenantError
from mtcompile.ir.graph import Opaque, OtherTy, TensorTy, TupleTy


def lift_type(ty, where: str) -> TensorTy | TupleTy | OtherTy:
    """Our type of a Relax type; static shapes only."""
    if isinstance(ty, relax.TensorType):
        if ty.shape is None or not hasattr(ty.shape, "values"):
            raise TenantError(f"{where}: tensor of unknown rank ({ty}); dynamic shapes are "
                              "not supported, give static input shapes")
        dims = []
        for d in ty.shape.values:
            if not isinstance(d, tvm.tirx.IntImm):
                raise TenantError(f"{where}: symbolic dimension {d} in {ty}; dynamic shapes are "
                                  "not supported, give static input shapes")
            dims.append(int(d))
        return TensorTy(tuple(dims), str(ty.dtype))
    if isinstance(ty, relax.TupleType):
        return TupleTy(tuple(lift_type(f, where) for f in ty.fields))
    return OtherTy(" ".join(str(ty).split()))


def opaque(obj) -> Opaque:
    """Wrap a TVM object, keyed by its structural hash and printed on one line."""
    text = " ".join(str(obj).split())
    text = re.sub(r"^relax\.attrs\.\w+\((.*)\)$", r"\1", text)
    return Opaque(obj, f"{tvm_ffi.structural_hash(obj):x}:{text}", text)
