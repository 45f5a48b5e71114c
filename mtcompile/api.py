"""`compile`: tenants -> import -> lift -> merge -> passes -> lower -> TVM -> Bundle."""

from __future__ import annotations

import functools
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mtcompile import build_cache, bundle_manifest
from mtcompile.abi import RUN_ALL
from mtcompile.analysis.memory import MemoryPlan
from mtcompile.backend import emitted
from mtcompile.backend.arena import ArenaError
from mtcompile.backend.kernels import resolve_providers
from mtcompile.backend.lowering import HOST_CPU, TARGETS, build, cpu_facts, emit_module
from mtcompile.backend.stream_layout import stream_layout
from mtcompile.backend.tuning import load_database
from mtcompile.compiled import CompiledBundle
from mtcompile.errors import MTCompileError, TenantError
from mtcompile.frontend.fold import fold_constants
from mtcompile.frontend.importers import import_tenant
from mtcompile.frontend.lift import lift
from mtcompile.frontend.merge import merge
from mtcompile.ir import legalize
from mtcompile.ir.graph import Graph, TensorTy
from mtcompile.ir.module import Module
from mtcompile.pass_infra import (
    AnalysisManager,
    Instrument,
    PassContext,
    analysis_manager,
    run_passes,
)
from mtcompile.runtime.cpu import usable_cores
from mtcompile.runtime.threads import configure as configure_threads
from mtcompile.runtime.weights import info as weights_table
from mtcompile.tenant import Tenant, check_subsets


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


def _import(tenants: list[Tenant], stages: _Stages) -> tuple[list, list[Graph]]:
    """Import and lift every tenant: (imported tenants, their graphs)."""
    t0 = time.perf_counter()
    imported, graphs = [], []
    for t in tenants:
        t1 = time.perf_counter()
        it = import_tenant(t)
        imported.append(it)
        graphs.append(lift(fold_constants(it.mod["main"], t.name), t.name, it.input_names))
        stages.say(
            f"  import {t.name} ({it.kind}): {len(graphs[-1])} nodes, "
            f"{time.perf_counter() - t1:.2f} s"
        )
    stages.done("import", t0)
    return imported, graphs


def _front(
    tenants: list[Tenant],
    target: str,
    pipeline,
    instruments,
    stages: _Stages,
    providers: dict[str, str],
    cores: int | None = None,
    lifted=None,
    subsets: dict[str, tuple[str, ...]] | None = None,
):
    """Import (unless `lifted`, what `_import` returned, is given), lift, merge into a
    module of functions (each tenant's entry, run_all, `subsets`: name -> tenants) and run
    the pipeline once over it: (module, imported tenants, their graphs, pass records, the
    module's `AnalysisManager`). cores: the threads the bundle runs on (default: the
    machine's cores)."""
    imported, graphs = lifted or _import(tenants, stages)
    t0 = time.perf_counter()
    merged = merge(graphs, {t.name: t.shared_inputs for t in tenants if t.shared_inputs})
    module = Module.of(merged, RUN_ALL, subsets or {})
    stages.done("merge", t0)
    t0 = time.perf_counter()
    # the threads the bundle runs on, read once per build: passes learn machine facts from
    # the context (assign-streams splits them between streams)
    ctx = PassContext(
        target,
        providers,
        cores=cores or usable_cores(),
        kernel_model=functools.partial(emitted.kernel_dag, target=target),
    )
    analyses = analysis_manager(module.functions, ctx.providers())
    module, records = run_passes(module, pipeline, ctx, instruments, analyses)
    stages.done("passes", t0)
    return module, imported, graphs, records, analyses


def _memory_plan(module: Module, analyses: AnalysisManager) -> MemoryPlan | None:
    """Every function's memory plan, by function (None when plan-memory did not run)."""
    plans = [p for f in module.functions if (p := analyses.cached(f, MemoryPlan)) is not None]
    return (
        MemoryPlan({f: p for plan in plans for f, p in plan.functions.items()}) if plans else None
    )


def _lower_and_build(
    stages: _Stages,
    module: Module,
    streams,
    target: str,
    database,
    cpu: str,
    facts: dict,
    cpu_info: tuple,
):
    """Manifest, lowering and TVM build: (manifest, executable, build facts). A stream
    layout whose shared arena does not fit the kernels TVM emitted (an `ArenaError`: a
    bug of the kernel model, which the tests look for) is dropped with a warning, and
    run_all is built on one stream, its arena planned on TVM's kernels."""
    cpu_name, cpu_features = cpu_info
    manifest = bundle_manifest.manifest(**facts, layout=streams).with_(
        cpu=cpu_name, cpu_features=cpu_features
    )
    t0 = time.perf_counter()
    memory = _memory_plan(module, facts["analyses"])
    mod = emit_module(module, manifest.embedded(), streams, target, memory)
    stages.done("lower", t0)
    t0 = time.perf_counter()
    try:
        executable, build_info = build(mod, target, database, cpu, external_weights=True)
    except ArenaError as e:
        if streams is None:
            raise
        why = str(e).splitlines()[0]
        warnings.warn(
            f"{why}; run_all is built on one stream instead (please report this "
            "model: the stream plan's kernel model is wrong)",
            stacklevel=3,
        )
        stages.say("streams  dropped: the shared arena did not fit TVM's kernels")
        manifest, executable, build_info = _lower_and_build(
            stages, module, None, target, database, cpu, facts, cpu_info
        )
        build_info["streams_dropped"] = why
        return manifest, executable, build_info
    stages.done("build", t0)
    return manifest, executable, build_info


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
    cpu: str = "host",
    threads: int | None = None,
    cache: bool | str | os.PathLike | None = None,
    subsets: Sequence[Sequence[str]] = (),
) -> CompiledBundle:
    """Compile tenants into one Bundle: one TVM executable with an entry per tenant.

    passes: pass names to run (the default pipeline when None, ``[]`` for none);
    pass_options: ``{pass name: {option: value}}``; kernels: the provider of heavy ops,
    ``"native"``, ``"torch"`` or ``"tvm"`` for all, or ``{"matmul": ..., "conv2d": ...}``
    (default: native on CPU); tuning_db: a directory written by `tune` whose schedules are applied to TVM
    kernels; progress: called with one line per stage (the CLI prints them); cpu: what TVM's
    CPU kernels are compiled for: ``"host"`` (this machine's CPU, the default), ``"generic"``
    (any x86-64) or an LLVM CPU name (recorded in the manifest with its features: `load`
    refuses a CPU that lacks them); threads: TVM's thread pool size for this process
    (default: the machine's cores; see `mtcompile.runtime.threads`); cache: reuse and keep
    built libraries in a build cache (`mtcompile.build_cache`): True for the default
    directory, or a directory; a bundle served from it has no `graph`. subsets: groups of
    tenants (``[("a", "b"), ...]``) that each get a merged function of their own
    (``run_some__a__b``), which `Bundle.run_some` calls for exactly those tenants.
    """
    tenants = _check_tenants(tenants)
    subset_fns = check_subsets(subsets, [t.name for t in tenants])
    legalize.register()  # before any TVM pass legalizes (the importers' constant folding)
    s = _settings(target, name, cpu, threads, passes, pass_options, kernels, tuning_db, cache)
    stages = _Stages(progress or (lambda _msg: None))
    lifted = _import(tenants, stages)
    cache_dir, key, key_doc, cached = _look_up(
        cache, instruments, stages, tenants, threads, name, target, s, lifted, subset_fns
    )
    if cached is not None:
        return cached
    bundle = _build_uncached(
        tenants, target, name, cpu, threads, instruments, stages, s, lifted, subset_fns
    )
    _store(cache_dir, key, key_doc, bundle, stages)
    return bundle


def _build_uncached(
    tenants: list[Tenant],
    target: str,
    name: str,
    cpu: str,
    threads: int | None,
    instruments,
    stages: _Stages,
    s: _Settings,
    lifted: tuple[list, list[Graph]],
    subsets: dict[str, tuple[str, ...]],
) -> CompiledBundle:
    """What `compile` does when no cached bundle serves: merge and run the pipeline over
    the `lifted` tenants, lower and build with the manifest, and make the bundle."""
    module, imported, graphs, records, analyses = _front(
        tenants, target, s.pipeline, instruments, stages, s.providers, s.pool, lifted, subsets
    )
    manifest, executable, build_info = _lower_and_build(
        stages,
        module,
        stream_layout(analyses),
        target,
        s.database,
        cpu,
        dict(
            name=name,
            target=target,
            pipeline=s.pipeline,
            providers=s.providers,
            tuning_db=s.db_hash,
            tenants=tenants,
            imported=imported,
            module=module,
            analyses=analyses,
            graphs=graphs,
            records=records,
            subsets=subsets,
        ),
        (s.cpu_name, s.cpu_features),
    )
    emitted.forget()  # the kernel DAGs served the plans, the streams and the manifest
    return _bundle(
        executable, manifest, build_info, module, analyses, records, stages, tenants, threads
    )


@dataclass(frozen=True)
class _Settings:
    """What `compile` makes of its arguments before any work (a bad one fails there)."""

    cpu_name: str | None
    cpu_features: tuple[str, ...] | None
    pool: int  # TVM's thread pool size
    pipeline: list
    providers: dict[str, str]
    database: Any  # the tuning database, or None
    db_hash: str | None


def _settings(
    target: str,
    name: str,
    cpu: str,
    threads: int | None,
    passes,
    pass_options,
    kernels,
    tuning_db: str | None,
    cache=None,
) -> _Settings:
    """`compile`'s arguments checked and resolved, each failing before any work."""
    from mtcompile.passes import build_pipeline

    if target not in TARGETS:
        raise MTCompileError(f"unknown target {target!r}; expected one of {list(TARGETS)}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise MTCompileError(f"bundle name {name!r} is not a valid file name stem")
    if target != "llvm" and cpu != HOST_CPU:
        raise MTCompileError(f"cpu={cpu!r} applies to target llvm only, not {target}")
    cpu_name, cpu_features = cpu_facts(target, cpu)  # an unknown CPU fails before any work
    # before anything launches TVM's pool (constant folding)
    pool = configure_threads(threads).pool
    pipeline = build_pipeline(passes, pass_options)  # bad pass names fail before any work
    providers = resolve_providers(target, kernels)
    database = load_database(tuning_db, target) if tuning_db else None
    cache_dir = build_cache.resolve_dir(cache)
    if cache_dir is not None:
        build_cache.check_dir(cache_dir)  # an unusable cache fails before any work
    return _Settings(
        cpu_name,
        cpu_features,
        pool,
        pipeline,
        providers,
        database,
        build_cache.tuning_db_hash(database) if database else None,
    )


def _look_up(
    cache,
    instruments,
    stages: _Stages,
    tenants: list[Tenant],
    threads,
    name: str,
    target: str,
    s: _Settings,
    lifted: tuple[list, list[Graph]],
    subsets: dict[str, tuple[str, ...]],
) -> tuple[Any, str | None, dict | None, CompiledBundle | None]:
    """The build cache's directory (None: no cache), this build's key and key document, and
    the cached bundle when there is one. Instruments turn the cache off: they watch the
    passes, which a cached build skips."""
    cache_dir = build_cache.resolve_dir(cache)
    if cache_dir is not None and instruments:
        stages.say("cache    off: instruments watch the passes, which a cached build skips")
        cache_dir = None
    if cache_dir is None:
        return None, None, None, None
    key_doc = build_cache.key_doc(
        name=name,
        target=target,
        cpu=s.cpu_name,
        cpu_features=s.cpu_features,
        providers=s.providers,
        pipeline=s.pipeline,
        cores=s.pool,
        tuning_db=s.db_hash,
        tenants=tenants,
        imported=lifted[0],
        graphs=lifted[1],
        subsets=subsets,
    )
    key = build_cache.build_key(key_doc)
    cached = build_cache.lookup(
        cache_dir, key, sources={t.name: t for t in tenants}, threads=threads
    )
    stages.say(f"cache    {'hit' if cached else 'miss'} {key[:16]} in {cache_dir}")
    if cached is not None:
        cached.compile_report = {"stages_s": stages.seconds, "cache": {"hit": True, "key": key}}
    return cache_dir, key, key_doc, cached


def _store(cache_dir, key: str, key_doc: dict, bundle: CompiledBundle, stages: _Stages) -> None:
    """Keep a fresh build in the cache, when there is one (`cache_dir`)."""
    if cache_dir is None:
        return
    t0 = time.perf_counter()
    build_cache.store(cache_dir, key, key_doc, bundle)
    bundle.compile_report["cache"] = {"hit": False, "key": key}
    stages.done("store", t0)


def _bundle(
    executable,
    manifest,
    build_info: dict,
    module: Module,
    analyses: AnalysisManager,
    records,
    stages: _Stages,
    tenants: list[Tenant],
    threads,
) -> CompiledBundle:
    """The compiled bundle: the manifest completed with what TVM's build told (memory, the
    weights table), the compile report, and the module with its analyses."""
    arrays, args = build_info.pop("weights")
    # known once TVM has built the module, so kept beside the library's embedded manifest
    manifest = manifest.with_(
        memory=bundle_manifest.memory_info(
            _memory_plan(module, analyses), build_info["memory"], manifest
        ),
        weights=weights_table(arrays, args),
    )
    report = {
        "stages_s": stages.seconds,
        "build": build_info,
        "passes": [
            {
                "name": r.name,
                "seconds": round(r.seconds, 4),
                "changed": r.changed,
                "nodes_after": r.nodes_after,
                **r.info,
            }
            for r in records
        ],
    }
    return CompiledBundle(
        executable,
        manifest,
        weights=arrays,
        module=module,
        analyses=analyses,
        graph=module.functions[RUN_ALL],
        sources={t.name: t for t in tenants},
        compile_report=report,
        threads=threads,
    )


def tune(
    tenants: Sequence[Tenant],
    out_dir: str,
    trials: int = 64,
    passes: list[str] | None = None,
    pass_options: dict[str, dict[str, Any]] | None = None,
    *,
    kernels: str | dict[str, str] | None = "tvm",
    target: str | dict | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    rpc_wait_s: float = 30.0,
    builders: int | None = None,
    progress: Callable[[str], None] | None = None,
    on_trials: Callable[[int, int], None] | None = None,
    on_task: Callable[[dict], None] | None = None,
) -> dict:
    """Tune the TVM kernels of the merged tenants with MetaSchedule into `out_dir`.

    Build with the same tenants, passes and `kernels` and ``tuning_db=out_dir`` to use it.
    Trials already in `out_dir` count toward `trials` (a stopped run continues). target: the
    device measured, ``"llvm"`` (this machine's CPU, default) or an llvm TVM target dict;
    rpc_tracker ``"HOST:PORT"`` and rpc_key: measure on that tracker's servers with the key
    (rpc_wait_s: how long to wait for them); builders: parallel build workers (default the
    cores). Returns the number of tasks of the merged module, the sum over tenants compiled
    alone (the difference is what merging saved), records, trials measured, time taken and
    ``table``: per task its trials, best time (us) and the functions (tenants) that use it.
    on_trials: ``(trials just measured, most trials in all)``; on_task: a ``table`` row,
    after each batch of measurements.
    """
    from mtcompile.backend.tuning import tune as run_tuning

    say = progress or (lambda _msg: None)
    tenants = _check_tenants(tenants)
    tuning_target = _tuning_target(target)
    devices = _devices(rpc_tracker, rpc_key, rpc_wait_s, say)  # before the front end
    front = _tuning_front(tenants, passes, pass_options, kernels, tuning_target, say)
    result = run_tuning(
        front.prepared,
        tuning_target,
        out_dir,
        trials,
        progress=say,
        on_trials=on_trials,
        devices=devices,
        builders=builders,
        on_task=on_task,
    )
    return _with_merge_savings(result, front)


def _tuning_target(target):
    """The checked tuning target (`tuning.parse_target`), our legalizations registered first."""
    from mtcompile.backend.tuning import parse_target

    legalize.register()
    return parse_target(target)


@dataclass(frozen=True)
class _TuningFront:
    """What tuning extracts its tasks from, and what merging saves."""

    prepared: object  # the merged module, lowered and prepared as the build prepares it
    tasks_alone: int  # the tuning tasks of the tenants compiled alone
    providers: dict[str, str]  # the kernel provider of each heavy op kind


def _tuning_front(tenants, passes, pass_options, kernels, tuning_target, say) -> _TuningFront:
    """The merged module of `tenants` as the build lowers it, and the tuning tasks of the
    tenants compiled alone."""
    from mtcompile.passes import build_pipeline

    pipeline = build_pipeline(passes, pass_options)
    providers = resolve_providers("llvm", kernels)
    module, _, graphs, _, _ = _front(tenants, "llvm", pipeline, (), _Stages(say), providers)
    _check_static(module.functions[RUN_ALL])
    separate = _tasks_alone(graphs, pipeline, providers, tuning_target)
    return _TuningFront(_prepared(module), separate, providers)


def _with_merge_savings(result: dict, front: _TuningFront) -> dict:
    """The tuning run's `result` with the tasks of the tenants alone, the tasks merging
    removed, and the kernel providers."""
    return {
        **result,
        "tasks_tenants_alone": front.tasks_alone,
        "tasks_removed_by_merge": front.tasks_alone - result["tasks"],
        "kernels": front.providers,
    }


def _devices(rpc_tracker: str | None, rpc_key: str | None, wait_s: float, say):
    """The tracker's servers that measure (`tuning_remote.Devices`, checked: a wrong address
    or key fails in seconds, before the front end's imports), or None: this machine
    measures."""
    from mtcompile.backend.tuning_remote import Tracker

    if rpc_tracker is None and rpc_key is None:
        return None
    devices = Tracker.parse(rpc_tracker or "", rpc_key, wait_s=wait_s).check()
    say(
        f"tracker {rpc_tracker}: {devices.servers} server(s) with key {rpc_key!r}, "
        f"{devices.threads} thread(s) each"
    )
    return devices


def _check_static(graph: Graph) -> None:
    """MetaSchedule tunes kernels of fixed shapes: tenants with symbolic dims are refused."""
    dynamic = sorted(
        {n.tenant for n in graph.nodes if isinstance(n.ty, TensorTy) and n.ty.symbolic}
    )
    if dynamic:
        raise MTCompileError(
            f"tune: tenants {dynamic} have symbolic (dynamic) dims; "
            "MetaSchedule tunes kernels of fixed shapes: tune the tenants "
            "with static shapes (e.g. at the bound), or build without tuning"
        )


def _prepared(ir: Graph | Module):
    """`ir` lowered and prepared as the build prepares it (the module tuning extracts from)."""
    from mtcompile.backend import kernels

    return kernels.prepare(emit_module(ir))


def _tasks_alone(graphs: list[Graph], pipeline, providers: dict[str, str], target) -> int:
    """The tuning tasks of the tenants compiled alone, each with the kernel decisions the
    merged graph got (its fold-batch-norm and offload-library passes)."""
    from mtcompile.backend.tuning import count_tasks

    alone = [p for p in pipeline if p.name in ("fold-batch-norm", "offload-library")]
    ctx = PassContext("llvm", providers)
    return sum(count_tasks(_prepared(run_passes(g, alone, ctx)[0]), target) for g in graphs)
