"""Numerics check: each tenant's source model (PyTorch eager or onnxruntime) vs the bundle."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from mtcompile.errors import MTCompileError
from mtcompile.frontend.importers import eval_mode, load_onnx, to_numpy
from mtcompile.runtime.inputs import seeded_inputs
from mtcompile.tenant import Tenant


def seeded_run_all_inputs(bundle, seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
    """Seeded inputs for every tenant of `bundle` (``run_all``'s argument); an input several
    tenants share gets one value for all of them."""
    shared: dict[str, np.ndarray] = {}
    out = {}
    for i, t in enumerate(bundle.tenant_names):
        sig = bundle.signature(t)
        arrays = list(seeded_inputs(sig, seed * 100 + i))
        for j, s in enumerate(sig.inputs):
            if s.shared_as is not None:
                arrays[j] = shared.setdefault(s.shared_as, arrays[j])
        out[t] = tuple(arrays)
    return out


def reference_outputs(tenant: Tenant, inputs: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """Run the tenant's source model on `inputs` (numpy) and return its flat outputs."""
    import torch

    model = tenant.model
    if isinstance(model, torch.nn.Module | torch.export.ExportedProgram):
        exported = isinstance(model, torch.export.ExportedProgram)
        fn = model.module() if exported else model
        args = [torch.from_numpy(np.array(a)) for a in inputs]
        # An exported program's module() cannot change mode (train() raises): leave it be.
        with torch.no_grad(), contextlib.nullcontext() if exported else eval_mode(fn):
            result = fn(*args)
        leaves, _ = torch.utils._pytree.tree_flatten(result)
        return [to_numpy(x) for x in leaves]
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MTCompileError(f"tenant '{tenant.name}': verifying an ONNX tenant needs "
                             "onnxruntime (pip install onnxruntime)") from e
    proto = load_onnx(tenant)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # its warnings (unused initializers, ...) are not ours
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    feed = {i.name: a for i, a in zip(sess.get_inputs(), inputs, strict=True)}
    return list(sess.run(None, feed))


def compare(got: list[np.ndarray], want: list[np.ndarray], atol: float) -> dict[str, Any]:
    """Per-output errors. max_rel is max|got - want| / max|want| (error relative to scale)."""
    if len(got) != len(want):
        return {"ok": False, "error": f"{len(got)} outputs, source model gives {len(want)}"}
    outs, ok = [], True
    for g, w in zip(got, want, strict=True):
        w = np.asarray(w)
        if g.shape != w.shape:
            outs.append({"ok": False, "error": f"shape {g.shape} vs source {w.shape}"})
            ok = False
            continue
        diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(w).max()) if w.size else 0.0
        good = bool(max_abs <= atol) and not np.isnan(diff).any()
        outs.append({"ok": good, "max_abs": max_abs,
                     "max_rel": max_abs / scale if scale else max_abs})
        ok &= good
    return {"ok": ok, "outputs": outs}


def verify_bundle(bundle, inputs: dict[str, tuple] | None = None, seed: int = 0,
                  atol: float = 1e-4) -> dict:
    """Compare every tenant through `run`, and all of them through `run_all`."""
    if not bundle.sources:
        raise MTCompileError("verify needs the source models: compile the bundle in this "
                             "process, or pass load(dir, sources={name: Tenant})")
    inputs = dict(inputs or {})
    for i, name in enumerate(bundle.tenant_names):
        if name not in inputs:
            src = bundle.sources.get(name)
            if src is not None and src.example_inputs is not None:
                inputs[name] = tuple(to_numpy(x) for x in src.example_inputs)
            else:
                inputs[name] = seeded_inputs(bundle.signature(name), seed + i)
    inputs = {k: tuple(to_numpy(x) for x in v) for k, v in inputs.items()}
    all_out = bundle.run_all(inputs)
    result: dict[str, Any] = {"ok": True, "atol": atol, "tenants": {}}
    for name in bundle.tenant_names:
        if name not in bundle.sources:
            result["tenants"][name] = {"ok": False, "error": "no source model given"}
            result["ok"] = False
            continue
        want = reference_outputs(bundle.sources[name], inputs[name])
        single = compare(bundle.run(name, *inputs[name]), want, atol)
        together = compare(all_out[name], want, atol)
        entry = dict(single, run_all_ok=together["ok"])
        entry["ok"] = single["ok"] and together["ok"]
        result["tenants"][name] = entry
        result["ok"] &= entry["ok"]
    return result
