"""assign-streams: the kernel DAG of run_all -> streams (minimum chain cover) and minimal
syncs, attached as the graph's ``"streams"`` analysis (a `StreamAssignment`); nodes unchanged.

No profile exists at compile time, so kernel times are estimated from the graph: per
kernel ``overhead + max(flops / (rate * threads), bytes / bandwidth)`` with the rates of
`RATES` for the target. On CPU one stream gives every kernel all `cores`; N streams give
each kernel ``cores // N`` (the executor splits the cores), so only kernels that do not
scale with threads (launch-bound ones) gain, and at most `cores` kernels run at once; the
executor's own cost per run (`EXECUTOR_US`) is added, so on a small CPU `auto` keeps one
stream. A measured profile (`Bundle.profile`) can replace these estimates later through
`mtcompile.analysis.streams.assign` / `estimate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtcompile.analysis.schedule import Kernel
from mtcompile.analysis.streams import AUTO_MIN_SPEEDUP, POLICIES, StreamAssignment, assign
from mtcompile.errors import MTCompileError
from mtcompile.ir import ops
from mtcompile.ir.graph import ConstRef, Graph, Ref, TensorTy
from mtcompile.native import table
from mtcompile.pass_infra import Pass, PassContext, PassResult, option, register

# target -> (flops per us per thread, bytes per us, overhead us of a TVM kernel / library call)
RATES = {"llvm": (2.0e4, 1.0e4, 3.0, 8.0), "cuda": (1.0e7, 1.0e6, 5.0, 8.0)}
# target -> (us per stream, us per sync) the executor costs per run: thread hand-offs and
# events in Python (CPU: measured with `StreamExecutor` on the tiny and random sets, ~30-50
# us per stream; CUDA: a guess, untested)
EXECUTOR_US = {"llvm": (40.0, 20.0), "cuda": (10.0, 5.0)}
# stream lowering and the executor's CUDA path have not run on a GPU yet: until they have,
# `auto` keeps one stream on CUDA (forced streams still build)
CUDA_AUTO = False
# streams beyond this are a mistake, not a plan: each is a thread and a VM at run time
MAX_STREAMS = 256


def _shape(graph: Graph, arg) -> tuple[int, ...]:
    if isinstance(arg, ConstRef):
        return tuple(graph.constants[arg.key].shape)
    if isinstance(arg, Ref) and isinstance(graph.node(arg.name).ty, TensorTy):
        return graph.node(arg.name).ty.bound_shape
    return ()


def kernel_work(graph: Graph, k: Kernel) -> tuple[float, float]:
    """(flops, bytes moved) of one kernel: 2*M*N*K for matmul (both products of an attention
    call), 2*out*Cin/g*kh*kw for conv, one op per output (or input, for reductions) element
    otherwise."""
    flops = 0.0
    for name in k.nodes:
        n = graph.node(name)
        if not isinstance(n.ty, TensorTy):
            continue
        out = math.prod(n.ty.bound_shape)  # symbolic dims: the work at their bound
        op = ops.computes(n)  # a library call computes its heavy op
        call = ops.library_call(n)
        if call is not None and call.bias:
            flops += out  # the bias add that joined the call
        if op == "relax.matmul":
            flops += 2.0 * out * (_shape(graph, n.args[0]) or (1,))[-1]
        elif op == table.ATTENTION:  # q [B, S, D] @ kt [B, D, T], then by v [B, T, E]
            q, v = _shape(graph, n.args[0]) or (1,), _shape(graph, n.args[2]) or (1, 1)
            flops += 2.0 * out / max(v[-1], 1) * v[-2] * (q[-1] + v[-1])
        elif op == "relax.nn.conv2d":
            w = _shape(graph, n.args[1])
            flops += 2.0 * out * math.prod(w[1:]) if w else out
        else:
            flops += max(
                out,
                max((math.prod(_shape(graph, a)) for a in n.args if isinstance(a, Ref)), default=0),
            )
    moved = k.nbytes + sum(
        graph.node(r).ty.nbytes
        for r in k.reads
        if r in graph and isinstance(graph.node(r).ty, TensorTy)
    )
    return flops, float(moved)


def kernel_costs(graph: Graph, kernels, cpu: bool, threads: int) -> dict[str, float]:
    """Estimated microseconds per kernel with `threads` threads each (the cost model)."""
    rate, bandwidth, tvm_over, lib_over = RATES["llvm" if cpu else "cuda"]
    out = {}
    for k in kernels:
        f, b = kernel_work(graph, k)
        out[k.name] = (
            0.0
            if k.kind == "view"
            else (
                (lib_over if k.kind == "library" else tvm_over)
                + max(f / (rate * threads), b / bandwidth)
            )
        )
    return out


@register
@dataclass(frozen=True)
class AssignStreams(Pass):
    """Streams for run_all's kernels (Nimble's assignment), by `mtcompile.analysis.streams.assign`.

    streams: N forces at most N streams (1 = sequential); max_streams: a cap that `auto`
    may still reduce to 1; policy: ``auto`` (fall back to one stream when the estimated
    speedup is below `min_speedup`), ``max`` or ``sequential``; cores: CPU cores the
    streams share (None: ``ctx.cores``, the build machine's count; ignored on CUDA).
    """

    name = "assign-streams"
    scope = "run-all"  # lowering realizes streams for run_all; other functions run on one
    computes = ("streams",)
    # a memory plan was made for the stream order before this one: it must be made again
    preserves = ()
    streams: int | None = option(
        None, minimum=1, maximum=MAX_STREAMS, doc="force at most this many streams"
    )
    max_streams: int | None = option(
        None, minimum=1, maximum=MAX_STREAMS, doc="a cap on the streams auto may choose"
    )
    policy: str = option("auto", choices=POLICIES, doc="auto, max or sequential")
    cores: int | None = option(
        None, minimum=1, maximum=4096, doc="CPU cores the streams share (None: the machine's)"
    )
    min_speedup: float = option(
        AUTO_MIN_SPEEDUP,
        minimum=0.0,
        maximum=1e6,
        doc="the estimated speedup auto needs to keep several streams",
    )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        policy = self.policy
        dynamic = sorted(
            {n.tenant for n in graph.nodes if isinstance(n.ty, TensorTy) and n.ty.symbolic}
        )
        if dynamic:
            # a stream function defines no size variable of the values handed to it
            if (self.streams or 1) > 1 or policy == "max":
                raise MTCompileError(
                    f"assign-streams: tenants {dynamic} have symbolic (dynamic) dims; "
                    "several streams need fixed shapes: drop the streams option or give "
                    "those tenants static shapes"
                )
            policy = "sequential"
        dag = ctx.kernel_dag(graph)
        order = [k.name for k in dag.kernels]
        cpu = ctx.target != "cuda"
        cores = max(1, self.cores or ctx.cores) if cpu else 1

        per_stream, per_sync = EXECUTOR_US["llvm" if cpu else "cuda"]

        def cost(threads: int) -> dict[str, float]:
            return kernel_costs(graph, dag.kernels, cpu, threads)

        a = assign(
            order,
            dag.deps,
            streams=self.streams,
            max_streams=self.max_streams,
            policy=policy,
            cost_us=cost(cores),
            concurrent_cost_us=lambda n: cost(max(1, cores // n)),
            lanes=cores if cpu else None,
            min_speedup=self.min_speedup if cpu or CUDA_AUTO else math.inf,
            overhead_us=lambda n, syncs: n * per_stream + syncs * per_sync,
        )
        a = StreamAssignment(
            a.streams,
            a.syncs,
            a.policy,
            a.estimated_speedup,
            a.logical_concurrency,
            {**a.info, **({"cores": cores} if cpu else {})},
            kernel_us=cost(max(1, cores // a.num_streams)),
        )
        info = {
            **a.summary(),
            "kernels": len(order),
            "cost_model": "graph",
            "cores": cores,
            **({"sequential_for_dynamic": dynamic} if dynamic else {}),
        }
        return PassResult(graph.with_analysis("streams", a), False, info)
