"""Kernel providers and the CPU compile pipeline.

Per heavy op kind (``matmul``, ``conv2d``: `mtcompile.ir.ops.HEAVY`) the provider is
``native`` (our C++ kernels, `mtcompile.native`; the default on CPU), ``torch`` (PyTorch's
kernels, `mtcompile.runtime.library`) -- both called through ``call_dps_packed``, the
offload-library pass makes the calls on our graph -- or ``tvm`` (TVM code, scheduled by a
tuning database when one is given, else by TVM's default rules). Everything else is TVM
code that gets our parallel, vectorized default CPU schedule (TVM has none for it).
"""

from __future__ import annotations

import tvm
import tvm.sym
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from mtcompile.backend import arena
from mtcompile.errors import MTCompileError
from mtcompile.ir.ops import HEAVY, LIBRARY_PROVIDERS

PROVIDERS = (*LIBRARY_PROVIDERS, "tvm")
KINDS = tuple(dict.fromkeys(HEAVY.values()))  # the heavy op kinds a provider is chosen for
DEFAULT_PROVIDERS = {"llvm": dict.fromkeys(KINDS, "native"), "cuda": dict.fromkeys(KINDS, "tvm")}


def resolve_providers(target: str, kernels: str | dict[str, str] | None) -> dict[str, str]:
    """Provider per heavy op kind: the target's default, one name for all, or a dict."""
    chosen = dict(DEFAULT_PROVIDERS.get(target, dict.fromkeys(KINDS, "tvm")))
    if kernels is None:
        return chosen
    given = {k: kernels for k in chosen} if isinstance(kernels, str) else dict(kernels)
    for kind, prov in given.items():
        if kind not in chosen:
            raise MTCompileError(f"unknown op kind {kind!r} for kernels; expected {sorted(chosen)}")
        if prov not in PROVIDERS:
            raise MTCompileError(
                f"unknown kernel provider {prov!r} for {kind}; expected one of {list(PROVIDERS)}"
            )
        if prov in LIBRARY_PROVIDERS and target != "llvm":
            raise MTCompileError(f"the {prov} provider exists for target llvm only, not {target}")
    chosen.update(given)
    return chosen


def _f32(e) -> bool:
    ty = e.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


class CPUDefault(CPUScheduleRule):
    """Default CPU schedule for any kernel: inline, fuse spatial loops, parallel, vectorize."""

    MIN_PARALLEL = 32768  # below this much work per block (elements x reduction length),
    # waking the thread pool costs more than the second core gives (measured on softmax)
    LANES = 8  # float32 lanes of AVX2

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = dl.normalize_prim_func(sch)
        if infos is None:
            return None
        infos = _try_inline(sch, infos)
        for info in infos:
            block = info.block_rv
            loops = sch.get_loops(block)
            kinds = info.dom_kind()
            if not loops or len(kinds) != len(loops):
                continue
            s_loops = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
            r_loops = [lp for lp, k in zip(loops, kinds, strict=True) if k != "S"]
            if not s_loops:
                continue
            sch.reorder(*s_loops, *r_loops)
            fused = sch.fuse(*s_loops)
            extent = sch.get(fused).extent
            # a symbolic extent (dynamic batch) is judged at its symbols' value 1: the batch
            # the kernel must not slow; vectorized where the static part divides by the lanes
            n = _at_one(extent)
            if n is None:
                continue
            if (
                not r_loops
                and n >= 2 * self.LANES
                and tvm.sym.Analyzer().can_prove(tirx.floormod(extent, self.LANES) == 0)
            ):
                outer, inner = sch.split(fused, [None, self.LANES])
                sch.vectorize(inner)
                fused = outer
            work = n
            for lp in r_loops:
                ext = sch.get(lp).extent
                work *= int(ext) if isinstance(ext, tirx.IntImm) else self.MIN_PARALLEL
            if work >= self.MIN_PARALLEL and n >= 2:
                sch.parallel(fused)
        return sch


def _try_inline(sch, infos):
    """dlight's try_inline, except that no epilogue is inlined into a block with an init:
    normalize_prim_func drops unit reduction loops, so a reduction of length 1 (a 1x1 conv
    of one input channel, a Linear of one input feature, a sum over a dim of size 1) looks
    spatial, and TVM's reverse_compute_inline then applies the epilogue in the init and
    again in the update (a bias added twice)."""

    def trial(inline, ok=lambda _b: True):
        for i, info in enumerate(infos):
            try:
                if not ok(info.block_rv):
                    continue
                inline(info.block_rv)
            except Exception:  # noqa: BLE001 - not inlinable (a root block...), as in dlight
                continue
            return i
        return None

    def no_init_producer(block):
        return all(sch.get(p).init is None for p in sch.get_producers(block))

    while True:
        i = trial(sch.compute_inline)
        if i is None:
            i = trial(sch.reverse_compute_inline, no_init_producer)
        if i is None:
            return infos
        infos.pop(i)


def _at_one(extent) -> int | None:
    """A loop extent's value with every symbolic dim at 1 (None if that is not a constant)."""
    if isinstance(extent, tirx.IntImm):
        return int(extent)
    ana = tvm.sym.Analyzer()
    for v in tirx.analysis.undefined_vars(extent):
        ana.bind(v, tirx.const(1, "int64"))  # size variables are int64
    value = ana.simplify(extent)
    return int(value) if isinstance(value, tirx.IntImm) else None


def schedule_passes(database=None) -> list:
    """Our CPU kernel schedules: a tuning database's where it has one, else `CPUDefault`."""
    passes = []
    if database is not None:
        passes.append(relax.transform.MetaScheduleApplyDatabase(database, enable_warning=True))
    passes.append(dl.ApplyDefaultSchedule(CPUDefault()))
    return passes


def relax_prefix(target: tvm.target.Target, database=None) -> list:
    """TVM's Relax passes up to where our memory plans are realized: library dispatch,
    legalize, FuseOps/FuseTIR, on CPU our schedules (a kernel scheduled into a pure
    reshape becomes a view in ``RewriteDataflowReshape``), then dataflow lowering up to
    ``CallTIRRewrite``. The build runs them, and the kernel model
    (`mtcompile.backend.emitted`) reads its kernels off their result."""
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as tvm_pipeline

        schedules = []  # TVM's CUDA legalize passes schedule the kernels
    else:
        from tvm.relax.backend.cpu_generic import pipeline as tvm_pipeline

        schedules = schedule_passes(database)
    return (
        tvm_pipeline.library_dispatch_passes(target)
        + tvm_pipeline.legalize_passes(target)
        + schedules
        + tvm_pipeline.dataflow_lower_passes(target)
    )


def cpu_pipeline(target: tvm.target.Target, database=None, memory: dict | None = None):
    """Our CPU relax pipeline: TVM's default passes plus kernel schedules after fusion, and
    our memory plans realized before TVM plans the rest (`memory` gets their figures)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                relax_prefix(target, database)
                + [arena.realize_pass({} if memory is None else memory)]
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def gpu_pipeline(target: tvm.target.Target, memory: dict | None = None):
    """TVM's CUDA pipeline with our memory plans realized before TVM plans the rest."""
    from tvm.relax.backend.cuda import pipeline as gpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                relax_prefix(target)
                + [arena.realize_pass({} if memory is None else memory)]
                + gpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def _gelu(x):
    from tvm import topi

    return x * 0.5 * (1.0 + topi.fast_erf(x * 0.7071067811865476))


def _softmax(x, axis: int):
    from tvm import topi

    e = topi.fast_exp(x - topi.max(x, axis=axis, keepdims=True))
    return e / topi.sum(e, axis=axis, keepdims=True)


@relax.expr_functor.mutator
class _FastErf(relax.PyExprMutator):
    """erf and erf-GELU -> TVM's polynomial erf (vectorizes; the libm call does not: 8x faster
    on this CPU, within 1e-6 of erf); exp and softmax's exp -> TVM's fast_exp (a polynomial
    too: the scalar libm exp made softmax over BERT-mini's 4x64x64 scores ~100 us)."""

    def visit_call_(self, call):
        new = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or not _f32(call):
            return new
        from tvm import topi

        if call.op.name == "relax.erf":
            return self.builder_.call_te(topi.fast_erf, new.args[0])
        if call.op.name == "relax.nn.gelu":
            return self.builder_.call_te(_gelu, new.args[0])
        if call.op.name == "relax.exp":
            return self.builder_.call_te(topi.fast_exp, new.args[0])
        if call.op.name == "relax.nn.softmax":
            return self.builder_.call_te(_softmax, new.args[0], int(call.attrs.axis))
        return new


def fast_erf(mod: tvm.IRModule) -> tvm.IRModule:
    """Apply `_FastErf` to every Relax function of `mod`."""
    m = _FastErf(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(func))
    return m.builder_.get()


# reductions whose float16 sums PyTorch accumulates in float32 (its CPU kernels do)
_HALF_SUMS = {
    "relax.mean",
    "relax.sum",
    "relax.nn.adaptive_avg_pool1d",
    "relax.nn.adaptive_avg_pool2d",
    "relax.nn.avg_pool1d",
    "relax.nn.avg_pool2d",
}


@relax.expr_functor.mutator
class _HalfSums(relax.PyExprMutator):
    """A float16 mean, sum or average pool -> the same in float32, cast back: summed in
    float16, an average over 27x28 values was 0.037 off (PyTorch's own error: 0.0002)."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if (
            isinstance(call.op, tvm.ir.Op)
            and call.op.name in _HALF_SUMS
            and isinstance(call.args[0].ty, relax.TensorType)
            and str(call.args[0].ty.dtype) == "float16"
        ):
            x = self.builder_.emit(relax.op.astype(call.args[0], "float32"))
            wide = self.builder_.normalize(relax.Call(call.op, [x, *call.args[1:]], call.attrs))
            return relax.op.astype(wide, "float16")
        return call


def half_sums(mod: tvm.IRModule) -> tvm.IRModule:
    """Apply `_HalfSums` to every Relax function of `mod`."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = _HalfSums().visit_expr(func)
    return out


# ops whose TIR TVM 0.27's LLVM codegen cannot emit on bool operands: a compare is an
# fcmp of i1 values (invalid LLVM), an add/multiply/max/min fails ``CodeGenLLVM::CreateAdd``
# (``t.MatchesCode(kDLFloat)``): its integer paths take int and uint types, not bool
_BOOL_COMPARES = {
    "relax.equal",
    "relax.not_equal",
    "relax.less",
    "relax.less_equal",
    "relax.greater",
    "relax.greater_equal",
}
_BOOL_ARITH = {"relax.add", "relax.multiply", "relax.maximum", "relax.minimum"}


def _bool(e) -> bool:
    return isinstance(e.ty, relax.TensorType) and str(e.ty.dtype) == "bool"


@relax.expr_functor.mutator
class _BoolOps(relax.PyExprMutator):
    """A compare, add, multiply, maximum or minimum of bool tensors -> the same on uint8
    (False 0, True 1: the same order, and PyTorch's bool add/multiply are or/and), an
    arithmetic result cast back to bool. ``(a > 0) == (b > 0)`` otherwise fails to compile."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (
            isinstance(call.op, tvm.ir.Op)
            and call.op.name in _BOOL_COMPARES | _BOOL_ARITH
            and any(_bool(a) for a in call.args)
        ):
            return call
        args = [
            self.builder_.emit(relax.op.astype(a, "uint8")) if _bool(a) else a for a in call.args
        ]
        wide = self.builder_.normalize(relax.Call(call.op, args, call.attrs))
        return relax.op.astype(wide, "bool") if call.op.name in _BOOL_ARITH else wide


def bool_ops(mod: tvm.IRModule) -> tvm.IRModule:
    """Apply `_BoolOps` to every Relax function of `mod`."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = _BoolOps().visit_expr(func)
    return out


def prepare(mod: tvm.IRModule) -> tvm.IRModule:
    """Inference simplifications before TVM's pipeline: what is left of batch-norms
    decomposed (fold-batch-norm folded those after a conv on our graph), constants folded,
    compares and arithmetic on bool tensors done on uint8 (LLVM codegen has no bool ones),
    erf computed by a vectorizable polynomial, float16 sums accumulated in float32."""
    seq = tvm.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.FoldConstant(),
            relax.transform.CanonicalizeBindings(),
        ]
    )
    return fast_erf(half_sums(bool_ops(seq(mod))))
