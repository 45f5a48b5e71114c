"""plan-memory: every intermediate of the kernels that run -> an offset in one arena per
function (``run_all``, and each tenant's entry), live tensors never sharing a byte."""

from __future__ import annotations

from dataclasses import dataclass

from mtcompile.analysis.memory import ALIGNMENT, MemoryPlan, plan_function, sequential
from mtcompile.analysis.schedule import kernel_dag
from mtcompile.ir.graph import Graph
from mtcompile.pass_infra import Pass, PassContext, PassResult, register

STRATEGIES = ("greedy", "naive")


def _stream_order(graph: Graph, dag):
    """Happens-before over `dag`'s kernel indices from the stream assignment, if any."""
    streams = graph.analyses.get("streams")
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
    ``"memory"``; lowering realizes it as one storage per function.

    alignment: bytes every offset is a multiple of (default: 64 on CPU, 256 on CUDA).
    strategy: ``greedy`` (by size, best fit) or ``naive`` (every intermediate in bytes of
    its own: the no-reuse baseline benchmarks compare against).
    """

    name = "plan-memory"
    alignment: int | None = None
    strategy: str = "greedy"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        alignment = self.alignment or ALIGNMENT.get(ctx.target, 256)
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        functions = {}
        dag = kernel_dag(graph, ctx.kernels)
        functions["run_all"] = plan_function("run_all", dag, alignment,
                                             _stream_order(graph, dag), self.strategy)
        for t in graph.tenants:
            functions[t] = plan_function(t, kernel_dag(graph, ctx.kernels, [t]), alignment,
                                         strategy=self.strategy)
        run_all = functions["run_all"]
        return PassResult(graph.with_analysis("memory", MemoryPlan(functions)), False, {
            "arena_bytes": run_all.arena_bytes, "lower_bound_bytes": run_all.lower_bound_bytes,
            "naive_bytes": run_all.naive_bytes, "tensors": len(run_all.slots)})
