"""`compile`: tenants -> import -> lift -> merge -> passes -> lower -> TVM -> Bundle."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .abi import FORMAT
from .errors import MTCompileError, TenantError
from .frontends import import_tenant
from .ir import ConstRef, Graph, TensorTy
from .lift import lift
from .lowering import TARGETS, build, emit_module, input_index_bounds
from .merge import constant_bytes_before_merge, merge
from .pass_infra import Instrument, PassContext, run_passes
from .runtime import Bundle
from .tenant import Tenant


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import tvm

    return {"mtcompile": __version__, "tvm": tvm.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__}


def _io(graph: Graph, t: str, kind: str, source_hash: str, output_names=None) -> dict:
    io = graph.tenants[t]
    bounds = input_index_bounds(graph)
    inputs = []
    for local, node in io.inputs:
        ty = graph.node(node).ty
        inputs.append({"name": local, "shape": list(ty.shape), "dtype": ty.dtype})
        if node in bounds:
            inputs[-1]["index_bound"] = bounds[node]
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


def compile(  # noqa: A001 - the public name the API promises
    tenants: Sequence[Tenant],
    target: str = "llvm",
    passes: list[str] | None = None,
    pass_options: dict[str, dict[str, Any]] | None = None,
    *,
    name: str = "bundle",
    instruments: Sequence[Instrument] = (),
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Compile tenants into one Bundle: one TVM executable with an entry per tenant.

    passes: pass names to run (the default pipeline when None, ``[]`` for none);
    pass_options: ``{pass name: {option: value}}``; progress: called with one line per
    stage (the CLI prints them).
    """
    from mtcompile.passes import build_pipeline

    say = progress or (lambda _msg: None)
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
    if target not in TARGETS:
        raise MTCompileError(f"unknown target {target!r}; expected one of {list(TARGETS)}")
    pipeline = build_pipeline(passes, pass_options)  # bad pass names fail before any work

    stages: dict[str, float] = {}

    def stage(label: str, t0: float) -> None:
        stages[label] = round(time.perf_counter() - t0, 4)
        say(f"{label:<8} {stages[label]:7.2f} s")

    t0 = time.perf_counter()
    imported, graphs = [], []
    for t in tenants:
        t1 = time.perf_counter()
        it = import_tenant(t)
        imported.append(it)
        graphs.append(lift(it.mod["main"], t.name, it.input_names))
        say(f"  import {t.name} ({it.kind}): {len(graphs[-1])} nodes, "
            f"{time.perf_counter() - t1:.2f} s")
    stage("import", t0)

    t0 = time.perf_counter()
    graph = merge(graphs)
    stage("merge", t0)

    t0 = time.perf_counter()
    graph, records = run_passes(graph, pipeline, PassContext(target=target), list(instruments))
    stage("passes", t0)

    manifest = {
        "format": FORMAT,
        "name": name,
        "library": f"{name}.so",
        "target": target,
        "versions": _versions(),
        "pipeline": [{"name": p.name, "options": p.options()} for p in pipeline],
        "tenant_order": names,
        "tenants": {it.name: _io(graph, it.name, it.kind, it.source_hash,
                                 _output_names(t.model))
                    for it, t in zip(imported, tenants, strict=True)},
        "graph": dict(graph.stats(), weight_bytes_before_merge=constant_bytes_before_merge(graphs)),
    }
    t0 = time.perf_counter()
    mod = emit_module(graph, manifest)
    stage("lower", t0)

    t0 = time.perf_counter()
    executable = build(mod, target)
    stage("build", t0)

    report = {"stages_s": stages,
              "passes": [{"name": r.name, "seconds": round(r.seconds, 4), "changed": r.changed,
                          "nodes_after": r.nodes_after, **r.info} for r in records]}
    return Bundle(executable, manifest, graph=graph, sources={t.name: t for t in tenants},
                  compile_report=report)
