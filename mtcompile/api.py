"""`compile`: tenants -> import -> lift -> merge -> passes -> lower -> TVM -> Bundle."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from mtcompile import __version__
from mtcompile.analysis.memory import MemoryPlan, memory_report
from mtcompile.backend.kernels import resolve_providers
from mtcompile.backend.lowering import (
    TARGETS,
    build,
    emit_module,
    input_index_ranges,
    run_all_params,
    stream_layout,
)
from mtcompile.backend.tuning import load_database
from mtcompile.errors import MTCompileError, TenantError
from mtcompile.frontend.importers import import_tenant
from mtcompile.frontend.lift import lift
from mtcompile.frontend.merge import constant_bytes_before_merge, merge
from mtcompile.ir.graph import ConstRef, Graph, TensorTy
from mtcompile.pass_infra import EntryGraph, Instrument, PassContext, run_passes
from mtcompile.runtime.abi import FORMAT, RUN_ALL
from mtcompile.runtime.bundle import Bundle
from mtcompile.tenant import Tenant
from mtcompile.tools.viz import graph_view


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import tvm

    return {"mtcompile": __version__, "tvm": tvm.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__}


def _io(graph: Graph, t: str, kind: str, source_hash: str, output_names=None) -> dict:
    io = graph.tenants[t]
    ranges = input_index_ranges(graph)
    inputs = []
    for local, node in io.inputs:
        ty = graph.node(node).ty
        inputs.append({"name": local, "shape": list(ty.shape), "dtype": ty.dtype})
        if node in ranges:
            inputs[-1]["index_range"] = list(ranges[node])
        if node.startswith("shared."):
            inputs[-1]["shared_as"] = node.removeprefix("shared.")
    outputs = []
    for i, o in enumerate(io.outputs):
        ty = graph.node(o.name).ty if not isinstance(o, ConstRef) else TensorTy(
            tuple(graph.constants[o.key].shape), str(graph.constants[o.key].dtype))
        if not isinstance(ty, TensorTy):
            raise MTCompileError(f"tenant '{t}': output {i} is not a tensor ({ty})")
        name = output_names[i] if output_names and i < len(output_names) else f"output{i}"
        outputs.append({"name": name, "shape": list(ty.shape), "dtype": ty.dtype})
    return {"source": kind, "source_sha256": source_hash, "inputs": inputs, "outputs": outputs}


def _output_names(model) -> list[str] | None:
    try:
        import onnx
    except ImportError:  # pragma: no cover
        return None
    if isinstance(model, onnx.ModelProto):
        return [o.name for o in model.graph.output]
    return None


def _check_tenants(tenants: Sequence[Tenant]) -> list[Tenant]:
    tenants = list(tenants)
    if not tenants:
        raise TenantError("compile needs at least one tenant")
    for t in tenants:
        if not isinstance(t, Tenant):
            raise TenantError(f"expected mtcompile.Tenant objects, got {type(t).__name__}")
    names = [t.name for t in tenants]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise TenantError(f"duplicate tenant name(s) {dups}: every tenant needs its own name")
    return tenants


class _Stages:
    """Times the compile stages and reports one line per stage."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.seconds = say, {}

    def done(self, label: str, t0: float) -> None:
        self.seconds[label] = round(time.perf_counter() - t0, 4)
        self.say(f"{label:<8} {self.seconds[label]:7.2f} s")


def _front(tenants: list[Tenant], target: str, pipeline, instruments, stages: _Stages,
           providers: dict[str, str]):
    """Import, lift, merge and optimize: the tenants' merged Graph and what it came from."""
    t0 = time.perf_counter()
    imported, graphs = [], []
    for t in tenants:
        t1 = time.perf_counter()
        it = import_tenant(t)
        imported.append(it)
        graphs.append(lift(it.mod["main"], t.name, it.input_names))
        stages.say(f"  import {t.name} ({it.kind}): {len(graphs[-1])} nodes, "
                   f"{time.perf_counter() - t1:.2f} s")
    stages.done("import", t0)
    t0 = time.perf_counter()
    graph = merge(graphs, {t.name: t.shared_inputs for t in tenants if t.shared_inputs})
    stages.done("merge", t0)
    t0 = time.perf_counter()
    ctx = PassContext(target, providers)
    entry = EntryGraph(ctx)
    graph, records = run_passes(graph, pipeline, ctx,
                                [*instruments, entry])
    stages.done("passes", t0)
    return graph, entry.graph or graph, imported, graphs, records


def _with_tenant_plans(graph: Graph, entry_graph: Graph) -> MemoryPlan:
    """``run_all``'s plan from the optimized graph, the tenants' from their entries' graph."""
    plans = dict(graph.analyses["memory"].functions)
    entry = entry_graph.analyses.get("memory")
    if entry is not None:
        plans.update({t: p for t, p in entry.functions.items() if t != RUN_ALL})
    return MemoryPlan(plans)


def streams_manifest(graph: Graph, providers: dict[str, str], layout) -> dict:
    """The manifest's ``"streams"``: the assignment's summary, lanes and syncs of its
    simulated schedule (compile-time cost estimate) for notebooks, and what the runtime
    needs to run the stream functions when there are several; one stream without one."""
    a = graph.analyses.get("streams")
    if a is None:
        return {"num_streams": 1, "num_syncs": 0, "estimated_speedup": 1.0, "policy": None}
    from mtcompile.analysis.schedule import kernel_dag
    from mtcompile.analysis.streams import lanes_view
    from mtcompile.passes.assign_streams import graph_costs

    dag = layout.dag if layout is not None else kernel_dag(graph, providers)
    view = lanes_view(a, {k.name: k.tenant for k in dag.kernels}, graph_costs(graph, dag))
    # lowered: run_all runs on these streams (not without plan-memory: no shared arena)
    view["lowered"] = layout is not None
    return {**a.summary(), **view, **(layout.manifest() if layout is not None else {})}


def compile(  # noqa: A001 - the public name the API promises
    tenants: Sequence[Tenant],
    target: str = "llvm",
    passes: list[str] | None = None,
    pass_options: dict[str, dict[str, Any]] | None = None,
    *,
    name: str = "bundle",
    kernels: str | dict[str, str] | None = None,
    tuning_db: str | None = None,
    instruments: Sequence[Instrument] = (),
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Compile tenants into one Bundle: one TVM executable with an entry per tenant.

    passes: pass names to run (the default pipeline when None, ``[]`` for none);
    pass_options: ``{pass name: {option: value}}``; kernels: the provider of heavy ops,
    ``"library"`` or ``"tvm"`` for all, or ``{"matmul": ..., "conv2d": ...}`` (default: library
    on CPU); tuning_db: a directory written by `tune` whose schedules are applied to TVM
    kernels; progress: called with one line per stage (the CLI prints them).
    """
    from mtcompile.passes import build_pipeline

    tenants = _check_tenants(tenants)
    if target not in TARGETS:
        raise MTCompileError(f"unknown target {target!r}; expected one of {list(TARGETS)}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise MTCompileError(f"bundle name {name!r} is not a valid file name stem")
    pipeline = build_pipeline(passes, pass_options)  # bad pass names fail before any work
    providers = resolve_providers(target, kernels)
    database = load_database(tuning_db, target) if tuning_db else None
    stages = _Stages(progress or (lambda _msg: None))
    graph, entry_graph, imported, graphs, records = _front(tenants, target, pipeline,
                                                           instruments, stages, providers)

    manifest = {
        "format": FORMAT,
        "name": name,
        "library": f"{name}.so",
        "target": target,
        "versions": _versions(),
        "pipeline": [{"name": p.name, "options": p.options()} for p in pipeline],
        "kernels": providers,
        "tuning_db": str(tuning_db) if tuning_db else None,
        "tenant_order": [t.name for t in tenants],
        "run_all_inputs": [[list(u) for u in uses] for _, uses in run_all_params(graph)],
        "tenants": {it.name: _io(entry_graph, it.name, it.kind, it.source_hash,
                                 _output_names(t.model))
                    for it, t in zip(imported, tenants, strict=True)},
        # weights stored in the library: run_all's and the tenant entries' (they differ once a
        # run_all-only pass such as fuse-horizontal stacks weights)
        "graph": dict(graph.stats(), weight_bytes=int(sum(
            a.nbytes for a in {**entry_graph.constants, **graph.constants}.values())),
            weight_bytes_before_merge=constant_bytes_before_merge(graphs)),
        "graph_view": graph_view(graph, records),  # nodes and per-pass rows, for reports
    }
    streams = stream_layout(graph, providers)
    manifest["streams"] = streams_manifest(graph, providers, streams)
    t0 = time.perf_counter()
    mod = emit_module(graph, manifest, entry_graph, streams)
    stages.done("lower", t0)

    t0 = time.perf_counter()
    executable, build_info = build(mod, target, providers, database)
    stages.done("build", t0)

    # known once TVM has built the module, so kept beside the library's embedded manifest
    manifest["memory"] = memory_report(
        graph.analyses.get("memory") and _with_tenant_plans(graph, entry_graph),
        build_info["memory"], [t.name for t in tenants], manifest["graph"]["weight_bytes"],
        manifest["graph"]["weight_bytes_before_merge"])
    for fname, why in manifest["memory"]["mismatches"].items():
        stages.say(f"  memory: {fname}: {len(why)} tensor(s) left to TVM's own plan, the "
                   f"arena did not fit TVM's module ({why[0]})")
    report = {"stages_s": stages.seconds, "build": build_info,
              "passes": [{"name": r.name, "seconds": round(r.seconds, 4), "changed": r.changed,
                          "nodes_after": r.nodes_after, **r.info} for r in records]}
    return Bundle(executable, manifest, graph=graph, sources={t.name: t for t in tenants},
                  compile_report=report)


def tune(
    tenants: Sequence[Tenant],
    out_dir: str,
    trials: int = 64,
    passes: list[str] | None = None,
    pass_options: dict[str, dict[str, Any]] | None = None,
    *,
    kernels: str | dict[str, str] | None = "tvm",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Tune the TVM kernels of the merged tenants with MetaSchedule into `out_dir`.

    Build with the same tenants, passes and `kernels` and ``tuning_db=out_dir`` to use it.
    Returns the number of tasks of the merged module, the sum over tenants compiled
    alone (the difference is what merging saved), records written and time taken.
    """
    from mtcompile.backend import kernels as kernel_mod
    from mtcompile.backend.lowering import make_target
    from mtcompile.backend.tuning import count_tasks
    from mtcompile.backend.tuning import tune as run_tuning
    from mtcompile.passes import build_pipeline

    say = progress or (lambda _msg: None)
    tenants = _check_tenants(tenants)
    pipeline = build_pipeline(passes, pass_options)
    providers = resolve_providers("llvm", kernels)
    graph, entry_graph, _, graphs, _ = _front(tenants, "llvm", pipeline, (), _Stages(say),
                                              providers)
    target = make_target("llvm")

    def prepared(g: Graph, entries: Graph | None = None):
        return kernel_mod.offload(kernel_mod.prepare(emit_module(g, None, entries)),
                                  providers)[0]

    separate = sum(count_tasks(prepared(g), target) for g in graphs)
    result = run_tuning(prepared(graph, entry_graph), target, out_dir, trials, progress=say)
    result.update(tasks_tenants_alone=separate, tasks_removed_by_merge=separate - result["tasks"],
                  kernels=providers)
    return result
