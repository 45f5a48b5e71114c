"""The bundle's peers as per-tenant calls: PyTorch eager, onnxruntime, OpenVINO, AOTInductor
and torch.compile, each checked against eager before anything is timed.

A peer is a `Peer`: one call per tenant that returns the tenant's outputs, and a note per
tenant it could not build (an optional package missing, a compile that failed): such a peer
keeps its per-tenant calls but gets no set-level time, only the note. Every peer runs on
`THREADS` threads, like the bundle's pool and PyTorch (``torch.set_num_threads``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.coverage import TOLERANCE

THREADS = 2  # intra-op threads of every contender, as the bundle's pool has on this host
# OpenVINO at full float32 (its CPU default is bf16 or f16 where the CPU has them), latency
# mode (one stream), the same thread count as the others.
OPENVINO_CONFIG = {
    "INFERENCE_PRECISION_HINT": "f32",
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_NUM_THREADS": THREADS,
}
PEERS = ("openvino", "aotinductor", "torch.compile")  # the optional ones, `--peers` picks
# a bfloat16 contender's max error relative to max|eager| (verify's "bfloat16 kernels")
BF16_TOLERANCE = 2e-2


class PeerMismatch(AssertionError):
    """A peer's outputs are off from PyTorch eager's beyond the float32 tolerance."""


@dataclass
class Peer:
    """A contender as per-tenant calls returning outputs; `notes`: tenant -> why missing."""

    runners: dict[str, Callable[[], Any]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    compile_s: float = 0.0

    def run_all(self) -> None:
        """Every tenant once, in order."""
        for fn in self.runners.values():
            fn()

    def note(self) -> str:
        """The notes grouped by reason: "reason (tenant, tenant); ..."; empty if none."""
        by_reason: dict[str, list[str]] = {}
        for tenant, why in self.notes.items():
            by_reason.setdefault(why, []).append(tenant)
        return "; ".join(f"{why} ({', '.join(ts)})" for why, ts in by_reason.items())


def reason(e: BaseException) -> str:
    """An exception as a one-line note: its type and first line."""
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def build(names, make: Callable[[str], Callable[[], Any]]) -> Peer:
    """A peer from `make(tenant)` -> call; a tenant whose `make` raises gets a note."""
    peer, t0 = Peer(), time.perf_counter()
    for name in names:
        try:
            peer.runners[name] = make(name)
        except Exception as e:  # an optional peer failing on a tenant: a note, not a crash
            peer.notes[name] = reason(e)
    peer.compile_s = time.perf_counter() - t0
    return peer


def eager_peer(twins: dict, torch_inputs: dict) -> Peer:
    """PyTorch eager: each tenant's torch module under ``no_grad``."""

    def make(name):
        def call():
            with torch.no_grad():
                return twins[name](*torch_inputs[name])

        return call

    return build(twins, make)


def ort_peer(sessions: dict) -> Peer:
    """onnxruntime: ``{tenant: (session, feed)}`` as calls."""
    return build(sessions, lambda name: lambda s=sessions[name]: s[0].run(None, s[1]))


def openvino_peer(protos: dict, inputs: dict, precision: str = "f32") -> Peer:
    """OpenVINO (CPU plugin, `OPENVINO_CONFIG` at inference precision `precision`: ``f32``
    or ``bf16``): one compiled model per tenant, read from the ONNX model the onnxruntime
    session runs (the same graph, so the same numerics)."""
    try:
        import openvino as ov
    except ImportError as e:
        return Peer(notes=dict.fromkeys(protos, f"openvino not installed ({reason(e)})"))
    core = ov.Core()

    def make(name):
        model = core.read_model(
            protos[name].SerializeToString(), ov.Tensor(np.empty(0, np.uint8))
        )  # weights are embedded
        config = {**OPENVINO_CONFIG, "INFERENCE_PRECISION_HINT": precision}
        request = core.compile_model(model, "CPU", config).create_infer_request()
        feed = [np.asarray(x) for x in inputs[name]]
        return lambda: request.infer(feed)

    return build(protos, make)


def aoti_peer(twins: dict, torch_inputs: dict) -> Peer:
    """AOTInductor: ``torch.export`` of each twin, compiled ahead of time into a package
    (``aoti_compile_and_package``) and loaded back (``aoti_load_package``)."""

    def make(name):
        args = tuple(torch_inputs[name])
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            program = torch.export.export(twins[name], args)
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=str(Path(tmp) / f"{name}.pt2")
            )
            model = torch._inductor.aoti_load_package(path)
        return lambda: model(*args)

    return build(twins, make)


def compiled_peer(twins: dict, torch_inputs: dict) -> Peer:
    """torch.compile (default mode, inductor), compiled by a first call under ``no_grad``."""

    def make(name):
        model, args = torch.compile(twins[name]), tuple(torch_inputs[name])

        def call():
            with torch.no_grad():
                return model(*args)

        call()  # compiles now: a failure is this tenant's note, not a crash while timed
        return call

    return build(twins, make)


def flat(out) -> list[np.ndarray]:
    """A call's outputs (tensor, array, OpenVINO's result dict, or nested lists/tuples of
    them) as a flat list of numpy arrays."""
    if isinstance(out, torch.Tensor):
        return [out.detach().numpy()]
    if isinstance(out, np.ndarray):
        return [out]
    if hasattr(out, "to_tuple"):  # OpenVINO's OVDict, in the model's output order
        out = out.to_tuple()
    return [a for o in out for a in flat(o)]


def check(
    label: str, peer: Peer, reference: dict[str, list[np.ndarray]], tolerance: float = TOLERANCE
) -> dict[str, float]:
    """Max |peer - eager| per tenant; raises `PeerMismatch`, naming the peer and the tenant,
    where one is above `tolerance` times max(1, max|eager|)."""
    diffs = {}
    for name, fn in peer.runners.items():
        got, want = flat(fn()), reference[name]
        if [g.shape for g in got] != [w.shape for w in want]:
            raise PeerMismatch(
                f"{label} on tenant {name!r}: output shapes "
                f"{[g.shape for g in got]} != eager's {[w.shape for w in want]}"
            )
        diffs[name] = max(
            float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0
            for g, w in zip(got, want, strict=True)
        )
        bound = tolerance * max([1.0] + [float(np.max(np.abs(w))) for w in want if w.size])
        if not diffs[name] <= bound:
            raise PeerMismatch(
                f"{label} on tenant {name!r}: max |{label} - eager| {diffs[name]:.3e} > "
                f"{bound:.1e} ({'bfloat16' if tolerance > TOLERANCE else 'float32'} tolerance)"
            )
    return diffs


def optional_peers(
    chosen, twins: dict, torch_inputs: dict, protos: dict, inputs: dict
) -> dict[str, Peer]:
    """The optional peers named in `chosen` (of `PEERS`), built in that order."""
    makers = {
        "openvino": lambda: openvino_peer(protos, inputs),
        "aotinductor": lambda: aoti_peer(twins, torch_inputs),
        "torch.compile": lambda: compiled_peer(twins, torch_inputs),
    }
    return {label: makers[label]() for label in PEERS if label in chosen}
