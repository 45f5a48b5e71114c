"""A compiled bundle's `Manifest`, assembled from what the compiler produced: the tenants'
signatures, the graphs and their analyses, the stream layout, and the build's figures."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace

from mtcompile.abi import RUN_ALL
from mtcompile.analysis.index_ranges import input_index_ranges
from mtcompile.analysis.manager import AnalysisManager
from mtcompile.analysis.memory import MemoryPlan
from mtcompile.analysis.schedule import KernelDAG
from mtcompile.analysis.streams import StreamAssignment, lanes_view
from mtcompile.backend.stream_layout import StreamLayout, run_all_params
from mtcompile.errors import MTCompileError
from mtcompile.frontend.merge import constant_bytes_before_merge
from mtcompile.ir.graph import ConstRef, Graph, Sym, TensorTy
from mtcompile.ir.module import Module
from mtcompile.ir.view import graph_view
from mtcompile.runtime.manifest import (
    GraphStats,
    IOSpec,
    Manifest,
    MemoryInfo,
    PassSpec,
    StreamsInfo,
    SubsetFunction,
    TenantSig,
    output_files,
)
from mtcompile.version import __version__


def _plain(view):
    """A JSON view as it reads back from JSON (lists, not tuples): a saved manifest then
    equals the one in memory."""
    return json.loads(json.dumps(view))


def versions() -> dict[str, str]:
    """The versions a bundle records: TVM's must match where it loads (executable format)."""
    import onnx
    import torch
    import tvm

    return {
        "mtcompile": __version__,
        "tvm": tvm.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }


def output_names(model) -> list[str] | None:
    """An ONNX model's output names (other models' outputs are ``output<i>``)."""
    try:
        import onnx
    except ImportError:  # pragma: no cover
        return None
    if isinstance(model, onnx.ModelProto):
        return [o.name for o in model.graph.output]
    return None


def tenant_sig(
    graph: Graph, t: str, kind: str, source_hash: str, names: Sequence[str] | None = None
) -> TenantSig:
    """Tenant `t`'s signature from its inputs and outputs in `graph`."""
    io = graph.tenants[t]
    ranges = input_index_ranges(graph)
    inputs = []
    for local, node in io.inputs:
        ty = graph.node(node).ty
        shape, dims = sig_shape(ty, t)
        inputs.append(
            IOSpec(
                local,
                shape,
                ty.dtype,
                ranges.get(node),
                node.removeprefix("shared.") if node.startswith("shared.") else None,
                dims,
            )
        )
    outputs = []
    for i, o in enumerate(io.outputs):
        ty = (
            graph.node(o.name).ty
            if not isinstance(o, ConstRef)
            else TensorTy(tuple(graph.constants[o.key].shape), str(graph.constants[o.key].dtype))
        )
        if not isinstance(ty, TensorTy):
            raise MTCompileError(f"tenant '{t}': output {i} is not a tensor ({ty})")
        name = names[i] if names and i < len(names) else f"output{i}"
        shape, dims = sig_shape(ty, t)
        outputs.append(IOSpec(name, shape, ty.dtype, dims=dims))
    return TenantSig(kind, source_hash, tuple(inputs), tuple(outputs))


def sig_shape(ty: TensorTy, t: str) -> tuple[tuple[int | str, ...], dict | None]:
    """A signature's shape and dim bounds: a symbolic dim by its name without the
    ``<tenant>_`` prefix its size variable carries (``batch``, ``batch * 4``)."""
    if not ty.symbolic:
        return tuple(ty.shape), None
    strip = re.compile(rf"\b{re.escape(t)}_")
    shape = tuple(strip.sub("", d.text) if isinstance(d, Sym) else d for d in ty.shape)
    dims = {
        strip.sub("", n): (lo, hi) for d in ty.shape if isinstance(d, Sym) for n, lo, hi in d.bounds
    }
    return shape, dims


def streams_info(analyses: AnalysisManager, layout: StreamLayout | None) -> StreamsInfo:
    """run_all's stream assignment (in `analyses`): its summary, the lanes and syncs of its
    simulated schedule (with the cost estimate the assignment was made with) and, when
    run_all was lowered onto the streams (`layout`; not without plan-memory: no shared
    arena), the stream functions."""
    a = analyses.cached(RUN_ALL, StreamAssignment)
    if a is None:
        return StreamsInfo()
    dag = layout.dag if layout is not None else analyses.get(RUN_ALL, KernelDAG)
    view = lanes_view(a, {k.name: k.tenant for k in dag.kernels}, a.kernel_us)
    return StreamsInfo(
        num_streams=a.num_streams,
        num_syncs=a.num_syncs,
        estimated_speedup=round(a.estimated_speedup, 4),
        policy=a.policy,
        logical_concurrency=a.logical_concurrency,
        kernels_per_stream=tuple(len(s) for s in a.streams),
        estimate=dict(a.info),
        lanes=tuple(_plain(view["lanes"])),
        syncs=tuple(map(tuple, a.syncs)),
        run=layout.manifest() if layout is not None else None,
    )


def graph_stats(module: Module, graphs: Sequence[Graph]) -> GraphStats:
    """Counts of run_all's graph; weights stored in the library (every function's, each
    once: they differ where fuse-horizontal stacks weights) against the tenants' own before
    merging."""
    s = module.functions[RUN_ALL].stats()
    return GraphStats(
        nodes=s["nodes"],
        nodes_per_tenant=s["nodes_per_tenant"],
        ops=s["ops"],
        constants=s["constants"],
        weight_bytes=module.weight_bytes(),
        weight_bytes_before_merge=int(constant_bytes_before_merge(graphs)),
    )


def manifest(
    *,
    name: str,
    target: str,
    pipeline,
    providers: dict[str, str],
    tuning_db: str | None,
    tenants: Sequence,
    imported: Sequence,
    module: Module,
    analyses: AnalysisManager,
    graphs: Sequence[Graph],
    records,
    layout: StreamLayout | None,
    subsets: dict[str, tuple[str, ...]] | None = None,
) -> Manifest:
    """The manifest known before TVM builds the module (embedded in the library);
    `analyses`: the module's analyses after the pipeline (run_all's streams)."""
    graph = module.functions[RUN_ALL]
    sigs = _signatures(module, tenants, imported)
    return Manifest(
        name=name,
        library=f"{name}.so",
        target=target,
        versions=versions(),
        pipeline=tuple(PassSpec(p.name, _plain(p.options())) for p in pipeline),
        kernels=dict(providers),
        tuning_db=str(tuning_db) if tuning_db else None,
        tenant_order=tuple(t.name for t in tenants),
        run_all_inputs=tuple(tuple(map(tuple, uses)) for _, uses in run_all_params(graph)),
        tenants=sigs,
        subsets={
            f: SubsetFunction(
                ts,
                tuple(tuple(map(tuple, uses)) for _, uses in run_all_params(module.functions[f])),
            )
            for f, ts in (subsets or {}).items()
        },
        graph=graph_stats(module, graphs),
        graph_view=_plain(graph_view(graph, records)),  # nodes and per-pass rows, for reports
        streams=streams_info(analyses, layout),
    )


def _signatures(module: Module, tenants: Sequence, imported: Sequence) -> dict[str, TenantSig]:
    """Each tenant's signature, from its entry's graph, with its output files."""
    sigs = {
        it.name: tenant_sig(
            module.functions[it.name], it.name, it.kind, it.source_hash, output_names(t.model)
        )
        for it, t in zip(imported, tenants, strict=True)
    }
    files = output_files({n: [o.name for o in s.outputs] for n, s in sigs.items()})
    return {
        n: replace(
            s, outputs=tuple(replace(o, file=f) for o, f in zip(s.outputs, files[n], strict=True))
        )
        for n, s in sigs.items()
    }


def memory_info(plan: MemoryPlan | None, built: dict[str, dict], m: Manifest) -> MemoryInfo:
    """Memory of the built bundle, from the plan (None when plan-memory did not run) and
    what the build found per function (`arena.realize_pass`'s figures).

    separate_plans_bytes: what TVM plans for each tenant's own entry, summed (each tenant
    compiled alone); tvm_plan_bytes: what TVM plans for ``run_all`` itself.
    """
    tenants = list(m.tenant_order)
    run_all = plan.functions.get(RUN_ALL) if plan is not None else None
    b = built.get(RUN_ALL, {})
    functions = {}
    for fname in [*tenants, RUN_ALL, *m.subsets]:
        fp = plan.functions.get(fname) if plan is not None else None
        functions[fname] = {
            **{k: int(v) for k, v in built.get(fname, {}).items()},
            **(
                {"lower_bound_bytes": fp.lower_bound_bytes, "naive_bytes": fp.naive_bytes}
                if fp
                else {}
            ),
        }
    # realized on the kernels TVM emitted (`arena.realize`), else the graph plan's figure
    return MemoryInfo(
        arena_bytes=int(b.get("arena_bytes", run_all.arena_bytes if run_all else 0)),
        lower_bound_bytes=int(
            b.get("lower_bound_bytes", run_all.lower_bound_bytes if run_all else 0)
        ),
        naive_bytes=run_all.naive_bytes if run_all else 0,
        tvm_plan_bytes=int(b.get("tvm_plan_bytes", 0)),
        unplanned_bytes=int(b.get("unplanned_bytes", 0)),
        separate_plans_bytes=int(sum(built.get(t, {}).get("tvm_plan_bytes", 0) for t in tenants)),
        separate_arena_bytes=int(
            sum(
                plan.functions[t].arena_bytes
                for t in tenants
                if plan is not None and t in plan.functions
            )
        ),
        weight_bytes=m.graph.weight_bytes,
        weight_bytes_before_dedup=m.graph.weight_bytes_before_merge,
        planned=run_all is not None,
        functions=functions,
        timeline=_plain(run_all.timeline()) if run_all is not None else None,
    )
