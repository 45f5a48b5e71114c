"""Our IR's view of Relax objects: Relax types -> `TensorTy`/`TupleTy`/`OtherTy`, and TVM
objects wrapped as `Opaque` (keyed by structural hash). Shared by lift, the node builder
and lowering; `mtcompile.ir.graph` itself stays free of TVM."""

from __future__ import annotations

import re

import tvm
import tvm.sym
import tvm_ffi
from tvm import relax

from mtcompile.errors import TenantError
from mtcompile.ir.graph import Opaque, OtherTy, Sym, TensorTy, TupleTy


def sym_dim(e, bounds: dict[str, tuple[int, int]], where: str) -> Sym:
    """Our `Sym` of a symbolic TVM dimension `e`; `bounds`: ``{variable: (lo, hi)}``."""
    names = list(tvm.tirx.analysis.undefined_vars(e))
    missing = sorted({v.name for v in names} - set(bounds))
    if missing:
        raise TenantError(
            f"{where}: symbolic dimension {missing[0]} has no bounds; declare "
            "them (dynamic_shapes Dim(min=, max=), or dim_bounds={name: "
            "(lo, hi)})"
        )
    at = {}
    for end in (0, 1):
        ana = tvm.sym.Analyzer()
        for v in names:
            ana.bind(v, tvm.tirx.const(bounds[v.name][end], "int64"))
        value = ana.simplify(e)
        if not isinstance(value, tvm.tirx.IntImm):
            raise TenantError(f"{where}: cannot evaluate symbolic dimension {e} at its bounds")
        at[end] = int(value)
    used = tuple(sorted((v.name, *bounds[v.name]) for v in {v.name: v for v in names}.values()))
    text = re.sub(r"T\.int64\((-?\d+)\)", r"\1", " ".join(str(e).split()))
    return Sym(text, min(at.values()), max(at.values()), used, e)


def ty_bounds(*tys) -> dict[str, tuple[int, int]]:
    """``{variable: (lo, hi)}`` of the symbolic dimensions of our types `tys`."""
    out: dict[str, tuple[int, int]] = {}
    for ty in tys:
        if isinstance(ty, TupleTy):
            out.update(ty_bounds(*ty.fields))
        elif isinstance(ty, TensorTy):
            for d in ty.shape:
                if isinstance(d, Sym):
                    out.update({n: (lo, hi) for n, lo, hi in d.bounds})
    return out


def size_vars(*tys) -> dict[str, object]:
    """``{name: TVM variable}`` of the size variables in our types `tys`."""
    out: dict[str, object] = {}
    for ty in tys:
        if isinstance(ty, TupleTy):
            out.update(size_vars(*ty.fields))
        elif isinstance(ty, TensorTy):
            for d in ty.shape:
                if isinstance(d, Sym) and d.obj is not None:
                    out.update({v.name: v for v in tvm.tirx.analysis.undefined_vars(d.obj)})
    return out


def undefined_size_vars(param_tys, body_tys) -> list:
    """The size variables `body_tys` read that no parameter type defines (a variable is
    defined by a dim that is the variable alone): a function must take them explicitly."""
    defined = {
        d.text
        for ty in param_tys
        if isinstance(ty, TensorTy)
        for d in ty.shape
        if isinstance(d, Sym) and len(d.bounds) == 1 and d.text == d.bounds[0][0]
    }
    used = size_vars(*param_tys, *body_tys)
    return [v for name, v in sorted(used.items()) if name not in defined]


def graph_bounds(graph) -> dict[str, tuple[int, int]]:
    """``{variable: (lo, hi)}`` of every symbolic dim of `graph`'s node types."""
    return ty_bounds(*(n.ty for n in graph.nodes))


def lift_type(
    ty, where: str, bounds: dict[str, tuple[int, int]] | None = None
) -> TensorTy | TupleTy | OtherTy:
    """Our type of a Relax type; a symbolic dimension needs its variables' `bounds`."""
    if isinstance(ty, relax.TensorType):
        if ty.shape is None or not hasattr(ty.shape, "values"):
            raise TenantError(
                f"{where}: tensor of unknown rank ({ty}); give input shapes "
                "(a dimension may be symbolic, the rank may not)"
            )
        dims = []
        for d in ty.shape.values:
            dims.append(
                int(d) if isinstance(d, tvm.tirx.IntImm) else sym_dim(d, bounds or {}, where)
            )
        return TensorTy(tuple(dims), str(ty.dtype))
    if isinstance(ty, relax.TupleType):
        return TupleTy(tuple(lift_type(f, where, bounds) for f in ty.fields))
    return OtherTy(" ".join(str(ty).split()))


def relax_type(ty: TensorTy) -> relax.TensorType:
    """The Relax type of our tensor type (a symbolic dimension as its TVM expression)."""
    return relax.TensorType([d.obj if isinstance(d, Sym) else d for d in ty.shape], ty.dtype)


def opaque(obj) -> Opaque:
    """Wrap a TVM object, keyed by its structural hash and printed on one line."""
    text = " ".join(str(obj).split())
    text = re.sub(r"^relax\.attrs\.\w+\((.*)\)$", r"\1", text)
    return Opaque(obj, f"{tvm_ffi.structural_hash(obj):x}:{text}", text)
