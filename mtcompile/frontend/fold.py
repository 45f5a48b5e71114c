"""Values a tenant computes from its small constants alone, computed once at import.

A model's causal mask, rotary tables and position ids are computed from literals (an
``arange``, a ``full``, a small table): values of the model, not of its inputs. TVM's
``FoldConstant`` folds them at every build, and every kernel-model query builds the function
again, each compiling every such kernel on its own through LLVM (6.4 of a Gemma build's 12.5
s). Here the function's bindings computed from constants of fewer than
`WEIGHT_MIN_BYTES` bytes (what the build keeps as literals: larger ones are weights, passed
as parameters, which TVM's fold never sees) are computed in one build and one VM call, and
the values they hand to the rest of the function become constants: the graph holds them as
TVM's fold would have left them, and the builds have nothing left to fold.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from mtcompile.analysis.divisors import DIVISIONS
from mtcompile.analysis.index_ranges import GATHERS
from mtcompile.errors import TenantError
from mtcompile.ir import legalize
from mtcompile.ir.graph import WEIGHT_MIN_BYTES

FNAME = "mtcompile_fold"
# left to the build, which checks them (a gather's index in range, an integer divisor not 0)
# before it folds them: evaluated here unchecked, a bad one would read out of bounds or
# give a made-up value
CHECKED = {*GATHERS, "relax.gather_nd", "relax.scatter_nd"}


def fold_constants(func: relax.Function, tenant: str) -> relax.Function:
    """`func` with the tensors it computes from small constants alone replaced by their
    values (unchanged when there are none)."""
    bindings = [b for block in func.body.blocks for b in block.bindings]
    folded = _foldable(bindings)
    literals = {b.var for b in bindings if isinstance(b.value, tvm.ir.expr.GenericConst)}
    frontier = [v for v in _frontier(bindings, func.body.body, folded) if v not in literals]
    if not frontier:
        return func
    values = _evaluate([b for b in bindings if b.var in folded], frontier, tenant)
    consts = {v: relax.const(a, dtype=str(a.dtype)) for v, a in zip(frontier, values, strict=True)}
    gone = folded - literals  # a constant's binding stays: lift makes no node of it
    blocks = [
        type(block)([b for b in block.bindings if b.var not in gone]) for block in func.body.blocks
    ]
    body = _Substitute(consts).visit_expr(relax.SeqExpr(blocks, func.body.body))
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)


def _small_const(e) -> bool:
    return isinstance(e, tvm.ir.expr.GenericConst) and (
        not hasattr(e.value, "shape") or e.value.numpy().nbytes < WEIGHT_MIN_BYTES
    )


def _literal(e, folded: set) -> bool:
    """Whether argument `e` is known at import: a folded value, a small constant, a static
    shape or another literal of the function."""
    if isinstance(e, relax.Var):
        return e in folded
    if isinstance(e, relax.Tuple):
        return all(_literal(f, folded) for f in e.fields)
    if isinstance(e, relax.ShapeExpr):
        return all(isinstance(v, tvm.tirx.IntImm) for v in e.values)
    if isinstance(e, tvm.ir.expr.GenericConst):
        return _small_const(e)
    if isinstance(e, relax.GlobalVar | relax.Function | relax.Call | relax.TupleGetItem):
        return False
    return True  # PrimValue of a literal, StringImm, DataTypeImm


def _checked(call) -> bool:
    """Whether the build checks `call`'s operands at run time (`CHECKED`, integer divisions)."""
    name = call.op.name
    integer = str(getattr(call.ty, "dtype", "")).startswith(("int", "uint"))
    return name in CHECKED or (name in DIVISIONS and integer)


def _static(ty) -> bool:
    shape = getattr(ty, "shape", None)
    return (
        isinstance(ty, relax.TensorType)
        and isinstance(shape, relax.ShapeExpr)
        and all(isinstance(v, tvm.tirx.IntImm) for v in shape.values)
    )


def _foldable(bindings) -> set:
    """Vars of the pure calls (and their tuples, items and aliases) computed from literals
    alone, with static types."""
    folded: set = set()
    for b in bindings:
        v = getattr(b, "value", None)
        if not isinstance(b, relax.VarBinding):
            continue
        if isinstance(v, relax.Call):
            ok = (
                isinstance(v.op, tvm.ir.Op)
                and bool(v.op.get_attr("FPurity"))
                and not _checked(v)
                and all(_literal(a, folded) for a in v.args)
            )
        elif isinstance(v, relax.TupleGetItem):
            ok = isinstance(v.tuple_value, relax.Var) and v.tuple_value in folded
        elif isinstance(v, tvm.ir.expr.GenericConst):
            ok = _small_const(v)
        elif isinstance(v, relax.Tuple | relax.Var):
            ok = (
                isinstance(v, relax.Var)
                and v in folded
                or (isinstance(v, relax.Tuple) and _literal(v, folded))
            )
        else:
            ok = False
        fields = getattr(b.var.ty, "fields", None)
        static = _static(b.var.ty) or (fields is not None and all(_static(f) for f in fields))
        if ok and static:
            folded.add(b.var)
    return folded


def _uses(e) -> list:
    found: list = []
    relax.analysis.post_order_visit(
        e, lambda x: found.append(x) if isinstance(x, relax.Var) else None
    )
    return found


def _frontier(bindings, result, folded: set) -> list:
    """The folded tensors the rest of the function reads (or returns), in binding order; a
    folded tuple read as a whole stays unfolded, with what it is made of (iterated until
    every value read is a tensor)."""
    while True:
        read = {u for b in bindings if b.var not in folded for u in _uses(b.value)}
        read |= set(_uses(result))
        whole = {v for v in read & folded if not _static(v.ty)}
        if not whole:
            order = [b.var for b in bindings]
            return [v for v in order if v in read and v in folded]
        folded -= whole


def _evaluate(bindings, outputs: list, tenant: str) -> list[np.ndarray]:
    """`outputs`' values: `bindings` as one function, built once and run once on the CPU."""
    bb, env = relax.BlockBuilder(), {}
    with bb.function(FNAME, []):
        with bb.dataflow():
            for b in bindings:
                env[b.var] = bb.emit(_Substitute(env).visit_expr(b.value))
            out = bb.emit_output(relax.Tuple([env[v] for v in outputs]))
        bb.emit_func_output(out)
    mod = bb.get()
    target = tvm.target.Target("llvm")
    legalize.register()  # our legalizations (integer division that never traps, ...)
    try:
        ex = tvm.compile(mod, target, relax_pipeline=_pipeline(target))
        got = relax.VirtualMachine(ex, tvm.cpu())[FNAME]()
    except Exception as e:
        raise TenantError(
            f"tenant '{tenant}': computing the {len(outputs)} values the model computes from "
            f"its constants failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    return [np.array(t.numpy()) for t in got]


def _pipeline(target):
    """TVM's CPU pipeline without its constant folding (it would build every kernel of this
    all-constant function on its own)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _run(mod, _ctx):
        with target:
            passes = cpu.library_dispatch_passes(target) + [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
            seq = cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            return tvm.transform.Sequential(passes + seq)(mod)

    return _run


@relax.expr_functor.mutator
class _Substitute(relax.PyExprMutator):
    """Reads of the folded vars -> their constants."""

    def __init__(self, consts: dict):
        super().__init__()
        self.consts = consts

    def visit_var_(self, v):
        return self.consts.get(v, v)

    def visit_dataflow_var_(self, v):
        return self.consts.get(v, v)
