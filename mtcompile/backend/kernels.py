"""Kernel providers and the CPU compile pipeline.

Per heavy op kind (``matmul``, ``conv2d``) the provider is ``library`` (PyTorch's kernels
through ``call_dps_packed``, see `library`) or ``tvm`` (TVM code, scheduled by a tuning
database when one is given, else by TVM's default rules). Everything else is TVM code
that gets our parallel, vectorized default CPU schedule (TVM has none for it).
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from mtcompile.backend import arena
from mtcompile.errors import MTCompileError
from mtcompile.runtime import library

HEAVY_OPS = {"relax.matmul": "matmul", "relax.nn.conv2d": "conv2d"}
PROVIDERS = ("library", "tvm")
DEFAULT_PROVIDERS = {"llvm": {"matmul": "library", "conv2d": "library"},
                     "cuda": {"matmul": "tvm", "conv2d": "tvm"}}


def resolve_providers(target: str, kernels: str | dict[str, str] | None) -> dict[str, str]:
    """Provider per heavy op kind: the target's default, one name for all, or a dict."""
    chosen = dict(DEFAULT_PROVIDERS.get(target, {"matmul": "tvm", "conv2d": "tvm"}))
    if kernels is None:
        return chosen
    given = {k: kernels for k in chosen} if isinstance(kernels, str) else dict(kernels)
    for kind, prov in given.items():
        if kind not in chosen:
            raise MTCompileError(f"unknown op kind {kind!r} for kernels; expected {sorted(chosen)}")
        if prov not in PROVIDERS:
            raise MTCompileError(f"unknown kernel provider {prov!r} for {kind}; "
                                 f"expected one of {list(PROVIDERS)}")
        if prov == "library" and target != "llvm":
            raise MTCompileError(f"the library provider exists for target llvm only, not {target}")
    chosen.update(given)
    return chosen


def _f32(e) -> bool:
    ty = e.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


def _conv_params(attrs) -> list[int] | None:
    if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW"
            or attrs.out_layout != "NCHW"):
        return None
    # out_dtype is "" or None (the ONNX importer) when it is the input's dtype
    if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "float32"):
        return None
    return [*map(int, attrs.strides), *map(int, attrs.padding), *map(int, attrs.dilation),
            int(attrs.groups)]


def _use_counts(func: relax.Function) -> dict:
    """How many bindings (or the return value) read each variable of `func`."""
    counts: dict = {}
    exprs = [b.value for blk in func.body.blocks for b in blk.bindings] + [func.body.body]
    for e in exprs:
        for v in relax.analysis.free_vars(e):
            counts[v] = counts.get(v, 0) + 1
    return counts


def _bias_of(const, out_ty, axis: int):
    """The 1-D bias a constant adds along `axis` of `out_ty`, or None if it adds otherwise."""
    if not isinstance(const, tvm.ir.expr.GenericConst) or not hasattr(const.value, "shape"):
        return None
    arr = const.value.numpy()
    rank, n = len(out_ty.shape), int(out_ty.shape[axis])
    if arr.dtype != "float32" or arr.size != n or arr.ndim > rank:
        return None
    expected = [1] * (rank - arr.ndim) + list(arr.shape)  # broadcast shape, right-aligned
    if expected[axis % rank] != n:
        return None
    return relax.const(arr.reshape(n), "float32")


@relax.expr_functor.mutator
class _Offload(relax.PyExprMutator):
    """matmul/conv2d (float32, NCHW/OIHW) -> call_dps_packed of the library kernels; a
    constant bias added to such a result alone joins the call (addmm, conv with bias)."""

    def __init__(self, mod, kinds: set[str], uses: dict):
        super().__init__(mod)
        self.kinds, self.uses = kinds, uses
        self.count = 0

    def visit_call_(self, call):
        new = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return new
        if call.op.name == "relax.add":
            return self._fold_bias(call, new)
        if HEAVY_OPS.get(call.op.name) not in self.kinds:
            return new
        out_ty = call.ty
        if not (all(_f32(a) for a in call.args[:2]) and isinstance(out_ty, relax.TensorType)
                and str(out_ty.dtype) == "float32"):
            return new
        if call.op.name == "relax.matmul":
            self.count += 1
            return relax.op.call_dps_packed(library.MATMUL, relax.Tuple(list(new.args)), out_ty)
        params = _conv_params(call.attrs)
        if params is None:
            return new
        self.count += 1
        args = [new.args[0], new.args[1], relax.ShapeExpr(params)]
        return relax.op.call_dps_packed(library.CONV2D, relax.Tuple(args), out_ty)

    def _fold_bias(self, call, new):
        """add(library matmul/conv, constant bias) -> one library call with the bias."""
        for i in (0, 1):
            var, const = call.args[i], call.args[1 - i]
            if not isinstance(var, relax.Var) or self.uses.get(var, 0) != 1:
                continue
            producer = self.lookup_binding(new.args[i])
            if not isinstance(producer, relax.Call) or producer.op != tvm.ir.Op.get(
                    "relax.call_dps_packed"):
                continue
            name = producer.args[0].global_symbol
            args = list(producer.args[1].fields)
            out_ty = producer.ty
            if name == library.MATMUL and len(args[1].ty.shape) == 2:
                bias = _bias_of(const, out_ty, -1)
                if bias is not None:
                    return relax.op.call_dps_packed(
                        library.MATMUL_BIAS, relax.Tuple([*args, bias]), out_ty)
            if name == library.CONV2D:
                bias = _bias_of(const, out_ty, 1)
                if bias is not None:
                    return relax.op.call_dps_packed(
                        library.CONV2D_BIAS, relax.Tuple([args[0], args[1], bias, args[2]]),
                        out_ty)
        return new


def offload(mod: tvm.IRModule, providers: dict[str, str]) -> tuple[tvm.IRModule, int]:
    """Rewrite heavy ops whose provider is ``library``; returns the module and the number of
    library calls (a bias add folded into its matmul/conv leaves an unused call behind,
    which dead-code elimination removes)."""
    kinds = {k for k, p in providers.items() if p == "library"}
    if not kinds:
        return mod, 0
    out = tvm.IRModule()
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            func = _Offload(mod, kinds, _use_counts(func)).visit_expr(func)
        out[gv] = func
    out = relax.transform.DeadCodeElimination()(out)
    calls = sum(str(out[gv]).count("call_dps_packed") for gv in out.functions
                if isinstance(out[gv], relax.Function))
    return out, calls


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
        infos = dl.try_inline(sch, infos)
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
            if not isinstance(extent, tirx.IntImm):
                continue
            n = int(extent)
            if not r_loops and n % self.LANES == 0 and n >= 2 * self.LANES:
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


def cpu_pipeline(target: tvm.target.Target, database=None, memory: dict | None = None):
    """Our CPU relax pipeline: TVM's default passes plus kernel schedules after fusion, and
    our memory plans realized before TVM plans the rest (`memory` gets their figures)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    def schedules():
        passes = []
        if database is not None:
            passes.append(relax.transform.MetaScheduleApplyDatabase(database, enable_warning=True))
        passes.append(dl.ApplyDefaultSchedule(CPUDefault()))
        return passes

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
                + schedules() + cpu.dataflow_lower_passes(target)
                + [arena.realize_pass({} if memory is None else memory)]
                + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline


def gpu_pipeline(target: tvm.target.Target, memory: dict | None = None):
    """TVM's CUDA pipeline with our memory plans realized before TVM plans the rest."""
    from tvm.relax.backend.cuda import pipeline as gpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                gpu.library_dispatch_passes(target) + gpu.legalize_passes(target)
                + gpu.dataflow_lower_passes(target)
                + [arena.realize_pass({} if memory is None else memory)]
                + gpu.finalize_passes(target))
            return seq(mod)

    return _pipeline


def _gelu(x):
    from tvm import topi

    return x * 0.5 * (1.0 + topi.fast_erf(x * 0.7071067811865476))


@relax.expr_functor.mutator
class _FastErf(relax.PyExprMutator):
    """erf and erf-GELU -> TVM's polynomial erf (vectorizes; the libm call does not: 8x faster
    on this CPU, within 1e-6 of erf)."""

    def visit_call_(self, call):
        new = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or not _f32(call):
            return new
        from tvm import topi

        if call.op.name == "relax.erf":
            return self.builder_.call_te(topi.fast_erf, new.args[0])
        if call.op.name == "relax.nn.gelu":
            return self.builder_.call_te(_gelu, new.args[0])
        return new


def fast_erf(mod: tvm.IRModule) -> tvm.IRModule:
    """Apply `_FastErf` to every Relax function of `mod`."""
    m = _FastErf(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(func))
    return m.builder_.get()


def prepare(mod: tvm.IRModule) -> tvm.IRModule:
    """Inference simplifications before kernels are chosen: batch-norm folded into conv,
    erf computed by a vectorizable polynomial."""
    seq = tvm.transform.Sequential([
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FoldConstant(),
        relax.transform.CanonicalizeBindings(),
    ])
    return fast_erf(seq(mod))
