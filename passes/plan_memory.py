"""plan-memory: every intermediate of a function's kernels -> an offset in the function's
one arena, live tensors never sharing a byte."""

from __future__ import annotations

from dataclasses import dataclass

from mtcompile.analysis.memory import ALIGNMENT, MemoryPlan, plan_function, sequential
from mtcompile.ir.graph import Graph
from mtcompile.pass_infra import Pass, PassContext, PassResult, option, register

STRATEGIES = ("greedy", "naive")


def _stream_order(streams, dag):
    """Happens-before over `dag`'s kernel indices from the stream assignment, if any."""
    if streams is None or streams.num_streams <= 1:
        return sequential
    from mtcompile.analysis.streams import happens_before

    names = [k.name for k in dag.kernels]
    hb = happens_before(streams)
    return lambda a, b: hb(names[a], names[b])


@register
@dataclass(frozen=True)
class PlanMemory(Pass):
    """Liveness over the kernel order (or the streams' happens-before order), then greedy
    by-size best-fit offsets. Tenants that run one after another in ``run_all`` share the
    whole arena; returned tensors leave it. Attaches a `MemoryPlan` as the analysis
    ``"memory"``, recording the stream assignment it was made for (so assign-streams
    invalidates it); lowering realizes it as one storage per function. Runs on every
    function of the module (``ctx.function``: its name).

    alignment: bytes every offset is a multiple of (default: 64 on CPU, 256 on CUDA).
    strategy: ``greedy`` (by size, best fit) or ``naive`` (every intermediate in bytes of
    its own: the no-reuse baseline benchmarks compare against).
    """

    name = "plan-memory"
    computes = ("memory",)
    preserves = ("streams",)
    # offsets are padded to it, so the arena grows with it: a page is the most that helps
    alignment: int | None = option(
        None, minimum=1, maximum=4096, power_of_two=True, doc="bytes every offset is a multiple of"
    )
    strategy: str = option("greedy", choices=STRATEGIES, doc="greedy or naive")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        alignment = self.alignment or ALIGNMENT.get(ctx.target, 256)
        streams = graph.analyses.get("streams")
        dag = ctx.kernel_dag(graph)
        fp = plan_function(ctx.function, dag, alignment, _stream_order(streams, dag), self.strategy)
        plan = MemoryPlan(
            {ctx.function: fp}, streams.fingerprint() if streams is not None else None
        )
        return PassResult(
            graph.with_analysis("memory", plan),
            False,
            {
                "arena_bytes": fp.arena_bytes,
                "lower_bound_bytes": fp.lower_bound_bytes,
                "naive_bytes": fp.naive_bytes,
                "tensors": len(fp.slots),
            },
        )
