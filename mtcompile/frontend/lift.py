"""Relax function -> tenant Graph, generically: one node per binding, no per-operator code."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from mtcompile.errors import TenantError
from mtcompile.ir.graph import (
    GET_ITEM,
    INPUT,
    TUPLE,
    ConstRef,
    Graph,
    Node,
    Opaque,
    Ref,
    TenantIO,
    TupleTy,
    const_key,
)
from mtcompile.ir.relax_types import lift_type, opaque


class _Lifter:
    def __init__(
        self, tenant: str, constants: dict[str, np.ndarray], bounds: dict[str, tuple[int, int]]
    ):
        self.tenant = tenant
        self.bounds = bounds  # size variable -> (lo, hi): symbolic dims of its types
        self.constants = constants
        self.nodes: list[Node] = []
        self.env: dict[object, Ref | ConstRef] = {}  # relax Var -> its value in our graph
        self.by_name: dict[str, Node] = {}

    def fresh(self, local: str) -> str:
        base = f"{self.tenant}.{local or 'v'}"
        name, i = base, 1
        while name in self.by_name:
            name, i = f"{base}_{i}", i + 1
        return name

    def const(self, c) -> ConstRef:
        arr = c.value.numpy()
        key = const_key(arr)
        self.constants.setdefault(key, arr)
        return ConstRef(key)

    def arg(self, e, where: str):
        if isinstance(e, relax.Var) and e not in self.env and isinstance(e.ty, tvm.ir.PrimType):
            # a size variable as a value (TVM 0.27's tirx.Var is a relax.Var), e.g. the end
            # of ``arange(0, batch)``: a literal of the function, like a ShapeExpr
            return opaque(e)
        if isinstance(e, relax.Var):
            if e not in self.env:
                raise TenantError(f"{where}: reads {e.name}, which is not defined before")
            return self.env[e]
        if isinstance(e, tvm.ir.expr.GenericConst) and hasattr(e.value, "shape"):
            return self.const(e)
        if isinstance(e, relax.Tuple):
            return tuple(self.arg(f, where) for f in e.fields)
        if isinstance(e, relax.GlobalVar | relax.Function | relax.Call):
            raise TenantError(f"{where}: nested {type(e).__name__} arguments are not supported")
        return opaque(e)  # ShapeExpr, PrimValue, StringImm, DataTypeImm, IntImm, ...

    def add(self, local: str, op: str, args: tuple, ty, attrs=None, ty_args=()) -> Ref:
        name = self.fresh(local)
        node = Node(name, op, args, ty, (self.tenant,), attrs, ty_args)
        self.nodes.append(node)
        self.by_name[name] = node
        return Ref(name)

    def binding(self, b) -> None:
        var, val = b.var, getattr(b, "value", None)
        where = f"tenant '{self.tenant}', binding {var.name}"
        if not isinstance(b, relax.VarBinding):
            raise TenantError(
                f"{where}: {type(b).__name__} is not supported (a shape computed from data?)"
            )
        ty = lift_type(var.ty, where, self.bounds)
        if isinstance(val, relax.Var):  # alias
            self.env[var] = self.arg(val, where)
        elif isinstance(val, tvm.ir.expr.GenericConst) and hasattr(val.value, "shape"):
            self.env[var] = self.const(val)
        elif isinstance(val, relax.Tuple):
            args = tuple(self.arg(f, where) for f in val.fields)
            self.env[var] = self.add(var.name, TUPLE, args, ty)
        elif isinstance(val, relax.TupleGetItem):
            src = self.arg(val.tuple_value, where)
            self.env[var] = self.add(var.name, GET_ITEM, (src,), ty, int(val.index))
        elif isinstance(val, relax.Call) and isinstance(val.op, tvm.ir.Op):
            args = tuple(self.arg(a, where) for a in val.args)
            pads = getattr(val.attrs, "padding", None) if val.attrs is not None else None
            if pads is not None and any(int(p) < 0 for p in pads):  # e.g. an ONNX pads of -1
                raise TenantError(
                    f"{where}: {val.op.name} has negative padding "
                    f"{[int(p) for p in pads]}; padding must be >= 0"
                )
            attrs = opaque(val.attrs) if val.attrs is not None else None
            ty_args = tuple(opaque(t) for t in val.ty_args)
            self.env[var] = self.add(var.name, val.op.name, args, ty, attrs, ty_args)
        else:
            what = f"call of {val.op}" if isinstance(val, relax.Call) else type(val).__name__
            raise TenantError(f"{where}: cannot lift a {what} binding")

    def outputs(self, ret, where: str) -> tuple:
        """Flatten the returned expression into a tuple of tensor values."""
        if isinstance(ret, relax.Tuple):
            return tuple(o for f in ret.fields for o in self.outputs(f, where))
        value = self.arg(ret, where)
        if isinstance(value, ConstRef):
            return (value,)
        node = self.by_name[value.name]
        if node.op == TUPLE:
            return tuple(o for a in node.args for o in self._flat(a))
        if isinstance(node.ty, TupleTy):
            return tuple(
                self.add(f"{node.name.split('.', 1)[1]}_{i}", GET_ITEM, (value,), f, i)
                for i, f in enumerate(node.ty.fields)
            )
        return (value,)

    def _flat(self, a) -> tuple:
        if isinstance(a, tuple):
            return tuple(o for x in a for o in self._flat(x))
        if isinstance(a, Opaque):
            raise TenantError(f"tenant '{self.tenant}': returns a non-tensor value {a}")
        return (a,)


def var_bounds(func: relax.Function) -> dict[str, tuple[int, int]]:
    """``{size variable: (lo, hi)}`` from TVM's ``tir_var_lower/upper_bound`` attrs."""
    attrs = func.attrs
    keys = attrs.keys() if attrs is not None else ()
    upper = attrs["tir_var_upper_bound"] if "tir_var_upper_bound" in keys else {}
    lower = attrs["tir_var_lower_bound"] if "tir_var_lower_bound" in keys else {}
    return {str(k): (int(lower[k]) if k in lower else 0, int(v)) for k, v in upper.items()}


def lift(func: relax.Function, tenant: str, input_names: list[str] | None = None) -> Graph:
    """The Graph of one tenant's Relax function (inputs named by `input_names` if given).
    Symbolic dims need bounds: the function's ``tir_var_lower/upper_bound`` attrs."""
    constants: dict[str, np.ndarray] = {}
    lf = _Lifter(tenant, constants, var_bounds(func))
    inputs = []
    names = input_names or [p.name for p in func.params]
    for p, local in zip(func.params, names, strict=True):
        ty = lift_type(p.ty, f"tenant '{tenant}', input {local}", lf.bounds)
        lf.env[p] = lf.add(local, INPUT, (), ty)
        inputs.append((local, lf.env[p].name))
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        raise TenantError(f"tenant '{tenant}': function body is a {type(body).__name__}")
    for block in body.blocks:
        for b in block.bindings:
            lf.binding(b)
    outputs = lf.outputs(body.body, f"tenant '{tenant}', return value")
    g = Graph(tuple(lf.nodes), {tenant: TenantIO(tuple(inputs), outputs)}, constants)
    g.verify()
    return g
