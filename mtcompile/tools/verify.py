"""Numerics check: each tenant's source model (PyTorch eager or onnxruntime) vs the bundle."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np

from mtcompile.errors import MTCompileError
from mtcompile.frontend.importers import eval_mode, load_onnx, to_numpy, to_torch
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
        args = [to_torch(np.array(a)) for a in inputs]
        # An exported program's module() cannot change mode (train() raises): leave it be.
        with torch.no_grad(), contextlib.nullcontext() if exported else eval_mode(fn):
            result = fn(*args)
        leaves, _ = torch.utils._pytree.tree_flatten(result)
        return [to_numpy(x) for x in leaves]
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MTCompileError(
            f"tenant '{tenant.name}': verifying an ONNX tenant needs "
            "onnxruntime (pip install onnxruntime)"
        ) from e
    proto = load_onnx(tenant)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # its warnings (unused initializers, ...) are not ours
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: a for i, a in zip(sess.get_inputs(), inputs, strict=True)}
    return list(sess.run(None, feed))


# (atol, rtol) by the least precise float dtype of a tenant (its inputs, outputs and
# weights); a float output passes when max|bundle - source| <= atol + rtol * max|source|.
# float32 and float64 are compared relative to the output's scale alone (an absolute floor
# would pass any model whose outputs are ~1e-10); float16 and bfloat16 at their own
# precision (PyTorch and the bundle round at different points); integer and bool outputs
# always exactly
TOLERANCES = {
    "float64": (0.0, 1e-4),
    "float32": (0.0, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 2e-2),
    # a float32 or float64 tenant whose dense layers and Winograd convs compute in bfloat16
    # (offload-library's precision): 1e-3 to 5e-3 of the scale on the demo sets
    "bfloat16 kernels": (0.0, 2e-2),
}
NEAR_ZERO = 1e-6  # a float output whose max|source| is at most this proves little
_PRECISION_ORDER = ("bfloat16", "float16", "float32", "float64")


def tenant_precision(tenant: Tenant | None, sig) -> str:
    """The least precise float dtype among a tenant's inputs, outputs and weights."""
    names = {s.dtype for s in (*sig.inputs, *sig.outputs)}
    model = tenant.model if tenant is not None else None
    import torch

    if isinstance(model, torch.nn.Module):
        names |= {
            str(t.dtype).removeprefix("torch.") for t in (*model.parameters(), *model.buffers())
        }
    elif isinstance(model, torch.export.ExportedProgram):
        names |= {
            str(t.dtype).removeprefix("torch.")
            for t in (*model.state_dict.values(), *model.constants.values())
            if isinstance(t, torch.Tensor)
        }
    elif model is not None:  # ONNX: its initializers' element types
        from onnx import TensorProto

        names |= {
            TensorProto.DataType.Name(i.data_type).lower()
            for i in load_onnx(tenant).graph.initializer
        }
    return next((d for d in _PRECISION_ORDER if d in names), "float32")


def compare(
    got: list[np.ndarray],
    want: list[np.ndarray],
    atol: float | None = None,
    rtol: float | None = None,
    precision: str = "float32",
) -> dict[str, Any]:
    """Per-output errors. max_rel is max|got - want| / max|want| (error relative to scale);
    a float output is ok when max|got - want| <= atol + rtol * max|want| (None: the
    `TOLERANCES` of `precision`), an integer or bool output when equal; dtypes must agree."""
    if len(got) != len(want):
        return {"ok": False, "error": f"{len(got)} outputs, source model gives {len(want)}"}
    default = TOLERANCES.get(precision, TOLERANCES["float32"])
    a_tol = default[0] if atol is None else atol
    r_tol = default[1] if rtol is None else rtol
    outs, ok = [], True
    for g, w in zip(got, want, strict=True):
        w = np.asarray(w)
        if g.shape != w.shape or g.dtype != w.dtype:
            outs.append(
                {
                    "ok": False,
                    "error": f"{g.dtype}{list(g.shape)} vs source {w.dtype}{list(w.shape)}",
                }
            )
            ok = False
            continue
        diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(w).max()) if w.size else 0.0
        exact = w.dtype.kind in "biu"
        limit = 0.0 if exact else a_tol + r_tol * scale
        good = bool(max_abs <= limit) and not np.isnan(diff).any()
        out = {
            "ok": good,
            "max_abs": max_abs,
            "max_rel": max_abs / scale if scale else max_abs,
            "scale": scale,
            "atol": 0.0 if exact else a_tol,
            "rtol": 0.0 if exact else r_tol,
        }
        if not exact and w.size and scale <= NEAR_ZERO:
            out["warning"] = (
                f"the source model's output is {'zero' if scale == 0 else 'near zero'}"
                f" everywhere (max|source| = {scale:.3g}): comparing it proves "
                "little; check with inputs or weights that give outputs of scale"
            )
        outs.append(out)
        ok &= good
    return {"ok": ok, "outputs": outs}


def verify_bundle(
    bundle,
    inputs: dict[str, tuple] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> dict:
    """Compare every tenant through `run`, and all of them through `run_all`; tolerances
    not given follow each tenant's precision (`TOLERANCES`)."""
    if not bundle.sources:
        raise MTCompileError(
            "verify needs the source models: compile the bundle in this "
            "process, or pass load(dir, sources={name: Tenant})"
        )
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
    result: dict[str, Any] = {"ok": True, "atol": atol, "rtol": rtol, "tenants": {}}
    for name in bundle.tenant_names:
        if name not in bundle.sources:
            result["tenants"][name] = {"ok": False, "error": "no source model given"}
            result["ok"] = False
            continue
        want = reference_outputs(bundle.sources[name], inputs[name])
        precision = tenant_precision(bundle.sources[name], bundle.signature(name))
        if precision in ("float32", "float64") and name in bundle.manifest.bf16_tenants():
            precision = "bfloat16 kernels"
        single = compare(bundle.run(name, *inputs[name]), want, atol, rtol, precision)
        together = compare(all_out[name], want, atol, rtol, precision)
        entry = dict(single, run_all_ok=together["ok"], precision=precision)
        entry["ok"] = single["ok"] and together["ok"]
        for k, o in enumerate(entry.get("outputs", ())):
            if "warning" in o:
                warnings.warn(f"verify: tenant '{name}', output {k}: {o['warning']}", stacklevel=3)
        result["tenants"][name] = entry
        result["ok"] &= entry["ok"]
    return result
