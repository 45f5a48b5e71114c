"""Converters of ours for ONNX ops that TVM 0.27's ONNX importer converts into a form
mtcompile cannot take, and the importer that applies them.

TVM's converters of ``Clip``, ``Pad``, ``Tile``, ``CumSum`` (``reverse=1``) and ``Einsum``
build their result with ``bb.emit_te(topi...)``: a ``call_tir`` of a TE PrimFunc, not a
Relax operator. Unless constant folding removes it (all inputs constant), mtcompile's
graph lift refuses such a call ("nested GlobalVar arguments"): MobileNetV2's ReLU6
(``Clip(x, 0, 6)``) and Swin's window padding (``Pad``) from torch.onnx's dynamo exporter
failed so. Ours emit the Relax operator that computes the same (``relax.clip`` /
``maximum`` / ``minimum``, ``nn.pad``, ``tile``, ``flip``, ``einsum``); a case they do not
cover (dynamic pads or repeats, negative pads, ...) goes to TVM's converter as before.

TVM's ``from_onnx`` takes no custom converter table, so `from_onnx` here runs TVM's
importer class with its operator lookup extended (`_Importer`); it also names the ONNX
node and op when a converter fails, and records which node made each binding, so that
a ``call_tir`` left in the module can be reported by node (`leftover_call_tir`).
Every converter is tested against onnxruntime (tests/test_zoo_onnx.py).
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _tvm

_FLOAT = ("float", "bfloat")


def _const_array(expr, params) -> np.ndarray | None:
    """The value of `expr` when it is a constant (or an initializer), else None."""
    if expr is None:
        return None
    c = _tvm.get_constant(expr, params)
    value = getattr(c, "value", None)
    if value is None or not hasattr(value, "numpy"):
        return None
    return value.numpy()


def _dtype(x) -> str:
    return str(x.ty.dtype)


class Clip(_tvm.Clip):
    """``min(max(x, lo), hi)`` as Relax ops; ``relax.clip`` when both bounds are float
    constants with ``lo <= hi``. A NaN bound is no bound (as onnxruntime and TVM treat it)."""

    @classmethod
    def _emit(cls, bb, x, lo, hi, params):
        dtype = _dtype(x)
        is_float = dtype.startswith(_FLOAT)
        values = []  # per bound: None when absent, its value when a constant scalar
        for b in (lo, hi):
            v = _const_array(b, params)
            values.append(None if b is None else v if v is not None and v.size == 1 else False)
        if is_float and all(v is not False for v in values):
            lo_v = -math.inf if values[0] is None else float(values[0].reshape(()))
            hi_v = math.inf if values[1] is None else float(values[1].reshape(()))
            lo_v = -math.inf if math.isnan(lo_v) else lo_v
            hi_v = math.inf if math.isnan(hi_v) else hi_v
            if lo_v <= hi_v:
                return bb.emit(relax.op.clip(x, lo_v, hi_v))
        out = x
        for bound, op, for_min in ((lo, relax.op.maximum, True), (hi, relax.op.minimum, False)):
            if bound is None:
                continue
            if is_float:
                bound = cls._sanitize_nan_clip_bound(bb, bound, for_min=for_min)
            out = bb.emit(op(out, bound))
        return out

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        lo = relax.const(float(attr.get("min", -np.inf)), _dtype(x))
        hi = relax.const(float(attr.get("max", np.inf)), _dtype(x))
        return cls._emit(bb, x, lo, hi, params)

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        return cls._impl_v13(bb, inputs, attr, params)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        lo = inputs[1] if len(inputs) > 1 else None
        hi = inputs[2] if len(inputs) > 2 else None
        return cls._emit(bb, inputs[0], lo, hi, params)


# ONNX Pad mode -> relax.nn.pad's
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


class Pad(_tvm.Pad):
    """``relax.nn.pad`` for constant, non-negative pads (TVM's converter otherwise)."""

    @classmethod
    def _lower_pad(cls, bb, inputs, attr, params, allowed_modes):
        mode = attr.get("mode", b"constant").decode("utf-8")
        pads = _const_array(inputs[1], params)
        rank = _tvm._get_known_tensor_rank(inputs[0])
        if mode not in allowed_modes or pads is None or rank is None or (pads < 0).any():
            return super()._lower_pad(bb, inputs, attr, params, allowed_modes)
        before, after, value = cls._parse_pads_and_axes(inputs, params)
        width = [int(p) for pair in zip(before, after, strict=True) for p in pair]
        return bb.emit(relax.op.nn.pad(inputs[0], width, _PAD_MODES[mode], float(value)))


class Tile(_tvm.Tile):
    """``relax.tile`` for constant repeats (TVM's converter for dynamic ones)."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        reps = _const_array(inputs[1], params)
        if reps is None:
            return super()._impl_v13(bb, inputs, attr, params)
        return bb.emit(relax.op.tile(inputs[0], [int(r) for r in reps.reshape(-1)]))


class CumSum(_tvm.CumSum):
    """``relax.flip`` around the scan for ``reverse=1`` (TVM's converter otherwise)."""

    @classmethod
    def _impl_v14(cls, bb, inputs, attr, params):
        axis = _const_array(inputs[1], params)
        if not attr.get("reverse", 0) or axis is None or axis.size != 1:
            return super()._impl_v14(bb, inputs, attr, params)
        axis = int(axis.reshape(()))
        data = bb.emit(relax.op.flip(inputs[0], axis))
        data = bb.emit(relax.op.cumsum(data, axis, exclusive=bool(attr.get("exclusive", 0))))
        return bb.emit(relax.op.flip(data, axis))


class Einsum(_tvm.Einsum):
    """``relax.einsum``."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        return bb.emit(relax.op.einsum(list(inputs), attr["equation"].decode("utf-8")))


def _checked_coords(bb, data, indices, start_axis: int):
    """The coordinates `indices` (last axis: one slot per data axis from `start_axis`) with
    negative ones wrapped as ONNX says, each slot read through ``take(arange(extent), c)``:
    the same values, by gathers that lowering bounds-checks. TVM's ``gather_nd`` and
    ``scatter_nd`` kernels read and write at their coordinates unchecked: a coordinate out
    of range read another element (``[1, 6]`` of a 5x6 tensor read ``[2, 0]``) or wrote past
    the tensor (a crash). A coordinate count that is not static keeps TVM's form."""
    m = indices.ty.shape[-1]
    if not isinstance(m, int | _tvm.tirx.IntImm):
        return _tvm._normalize_negative_indices(
            bb, indices, _tvm._coord_axis_extents(bb, data, indices, start_axis)
        )
    dtype, shape = _dtype(indices), data.ty.shape
    slots = []
    for k in range(int(m)):
        c = bb.emit(relax.op.take(indices, relax.const(k, "int64"), axis=-1))
        extent = shape[start_axis + k]
        if isinstance(extent, int | _tvm.tirx.IntImm):
            n = int(extent)
            if not dtype.startswith("uint"):
                neg = bb.emit(relax.op.less(c, relax.const(0, dtype)))
                c = bb.emit(relax.op.where(neg, bb.emit(relax.op.add(c, relax.const(n, dtype))), c))
            table = relax.const(np.arange(n, dtype=dtype), dtype)
        else:  # a symbolic extent: the kernel checks at the call's extent
            one = relax.prim_value(1)
            table = bb.emit(
                relax.op.arange(relax.prim_value(0), relax.prim_value(extent), one, dtype)
            )
        slots.append(bb.emit(relax.op.take(table, c, axis=0)))
    return bb.emit(relax.op.stack(slots, axis=-1))


class GatherND(_tvm.GatherND):
    """``gather_nd`` at checked coordinates (`_checked_coords`)."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        batch_dims = attr.get("batch_dims", 0)
        indices = _checked_coords(bb, inputs[0], inputs[1], batch_dims)
        return relax.op.gather_nd(inputs[0], indices, batch_dims)


class ScatterND(_tvm.ScatterND):
    """``scatter_nd`` at checked coordinates (`_checked_coords`)."""

    @staticmethod
    def _normalize_indices(bb, data, indices):
        return _checked_coords(bb, data, indices, 0)


CONVERTERS: dict[str, type] = {
    "GatherND": GatherND,
    "ScatterND": ScatterND,
    "Clip": Clip,
    "Pad": Pad,
    "Tile": Tile,
    "CumSum": CumSum,
    "Einsum": Einsum,
}


def convert_map() -> dict:
    """TVM's ONNX converter table with ours in place of its own."""
    return {**_tvm._get_convert_map(), **CONVERTERS}


class ConversionError(Exception):
    """A converter failed on one ONNX node: its op type and name, and TVM's error."""

    def __init__(self, op: str, node: str, error: Exception):
        first = str(error).splitlines()[0] if str(error) else ""
        super().__init__(f"ONNX node {node!r} (op {op}): {type(error).__name__}: {first}")
        self.op, self.node, self.error = op, node, error


class _Importer(_tvm.ONNXGraphImporter):
    """TVM's ONNX importer with `CONVERTERS` in its operator lookup; records the ONNX node
    (op, name) that made each binding (``origin``: Relax variable name -> (op, node))."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.origin: dict[str, tuple[str, str]] = {}
        self._seen: set = set()
        self._count = 0

    def _convert_operator(self, op_name, inputs, attrs, opset):
        custom = attrs.get("tvm_custom", {}) if isinstance(attrs, dict) else {}
        self._count += 1
        node = custom.get("name") or f"#{self._count - 1}"
        try:
            if op_name in CONVERTERS:
                sym = CONVERTERS[op_name].get_converter(opset)(
                    self.bb, inputs, attrs, [self._nodes, self._params]
                )
                if isinstance(sym, relax.Expr):
                    sym = self.bb.normalize(sym)
            else:
                sym = super()._convert_operator(op_name, inputs, attrs, opset)
        except Exception as e:
            raise ConversionError(op_name, node, e) from e
        self._claim(sym, (op_name, node))
        return sym

    def _claim(self, expr, where: tuple[str, str]) -> None:
        """Record `where` for every binding `expr` reaches that no earlier node made."""
        stack = [expr]
        while stack:
            e = stack.pop()
            if isinstance(e, relax.Tuple):
                stack.extend(e.fields)
            elif isinstance(e, relax.TupleGetItem):
                stack.append(e.tuple_value)
            elif isinstance(e, relax.Var) and e not in self._seen:
                self._seen.add(e)
                try:
                    value = self.bb.lookup_binding(e)
                except Exception:  # a function parameter or a variable of another scope
                    value = None
                if value is None:
                    continue
                self.origin.setdefault(e.name, where)
                if isinstance(value, relax.Call):
                    stack.extend(value.args)
                else:
                    stack.append(value)


def _model_opset(model) -> int:
    for o in model.opset_import:  # as TVM's from_onnx reads it
        if str(o.domain) in ("", "ai.onnx"):
            return int(o.version)
    return 1


def from_onnx(model, shape_dict=None, dtype_dict="float32"):
    """TVM's ``from_onnx`` with our converters: ``(IRModule, origin)``, origin mapping a
    Relax variable name of ``main`` to the ONNX (op, node name) that made it. A converter's
    failure is a `ConversionError` naming the node and op. (The caller checks the model
    with ``onnx.checker`` first: TVM's ``from_onnx`` only warns.)"""
    if model.ir_version < 3:
        raise ValueError(
            f"Model IR version {model.ir_version} not supported. Must be at least after 1.1.0."
        )
    importer = _Importer(shape_dict, dtype_dict)
    mod = importer.from_onnx(model.graph, _model_opset(model))
    return mod, importer.origin


def leftover_call_tir(func, origin: dict[str, tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``(op, node, PrimFunc name)`` per ``call_tir`` binding left in Relax function `func`
    (a TE computation a converter emitted that constant folding did not remove)."""
    out = []
    for block in func.body.blocks:
        for b in block.bindings:
            v = getattr(b, "value", None)
            if not (isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir"):
                continue
            callee = v.args[0]
            prim = getattr(callee, "name_hint", str(callee))
            op, node = origin.get(b.var.name, ("?", "?"))
            out.append((op, node, prim))
    return out
