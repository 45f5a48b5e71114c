"""Dynamic batch: one bundle for batch 1..max against static bundles built for each size,
PyTorch eager and onnxruntime with a dynamic batch axis, per batch size.

    python -m benchmarks.dynamic [--sizes 1 4 16] [--repeat 50] [--warmup 10] [--write]

Three tenants (a ResNet-style CNN, a transformer encoder classifier, an MLP), all
``nn.Module``s declared with ``dynamic_shapes={...: {0: Dim("batch", 1, max(sizes))}}``.
Everything runs in ONE process: per size, the dynamic bundle's ``run_all`` and the static
bundle of that size's ``run_all`` alternate call by call; then every tenant in PyTorch eager
and every tenant's onnxruntime session (exported once with a dynamic batch axis) each run in
blocks of their own (`coverage.block_times`); medians over the calls, ratios are contender
time / dynamic bundle time (above 1: the dynamic bundle is faster; the static row is the
cost of dynamism). Memory: run_all's
arena of the dynamic bundle (planned at the bound) against each static bundle's plan.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

import mtcompile
from mtcompile import Tenant
from mtcompile.models import mlp, resnet_cnn, transformer_encoder

from .coverage import block_times, round_times

RESULTS = Path(__file__).parent / "RESULTS.md"
ATOL = 1e-4


def models() -> dict[str, tuple[torch.nn.Module, str, callable]]:
    """name -> (module, its input's name, inputs at a batch size)."""
    vision, _ = resnet_cnn(seed=0)
    text, _ = transformer_encoder(seed=1, num_classes=10)
    head, _ = mlp(seed=2, d_in=256, hidden=512, d_out=64)
    return {
        "vision": (vision, "x", lambda b: resnet_cnn(seed=10, batch=b)[1]),
        "text": (
            text,
            "input_ids",
            lambda b: transformer_encoder(seed=11, batch=b, num_classes=10)[1],
        ),
        "mlp": (head, "x", lambda b: mlp(seed=12, batch=b, d_in=256, hidden=512, d_out=64)[1]),
    }


def tenants(ms: dict, batch: int, bound: int | None) -> list[Tenant]:
    """The tenants at `batch` (their example inputs), dynamic up to `bound` when given."""
    out = []
    for name, (module, arg, make) in ms.items():
        dyn = {arg: {0: Dim("batch", min=1, max=bound)}} if bound else None
        out.append(
            Tenant(
                name,
                module,
                example_inputs=make(max(batch, 2) if bound else batch),
                dynamic_shapes=dyn,
            )
        )
    return out


def ort_session(module, inputs: tuple, arg: str):
    """An onnxruntime session of `module` exported with a dynamic batch axis (2 threads,
    spinning off, as in `benchmarks.run`)."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            buf,
            input_names=[arg],
            output_names=["out"],
            dynamic_axes={arg: {0: "batch"}, "out": {0: "batch"}},
            dynamo=False,
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def run(sizes: list[int], repeat: int, warmup: int) -> dict:
    torch.set_num_threads(2)
    ms = models()
    bound = max(sizes)
    compile_s = {}
    t0 = time.perf_counter()
    dyn = mtcompile.compile(tenants(ms, 2, bound), name="dynamic")
    compile_s["dynamic"] = time.perf_counter() - t0
    static = {}
    for b in sizes:
        t0 = time.perf_counter()
        static[b] = mtcompile.compile(tenants(ms, b, None), name=f"static{b}")
        compile_s[f"static {b}"] = time.perf_counter() - t0
    sessions = {name: ort_session(m, make(2), arg) for name, (m, arg, make) in ms.items()}
    rows = {}
    for b in sizes:
        inputs = {name: tuple(np.asarray(x) for x in make(b)) for name, (_, _, make) in ms.items()}
        torch_inputs = {k: tuple(torch.from_numpy(x) for x in v) for k, v in inputs.items()}
        got = dyn.run_all(inputs)
        worst = 0.0
        with torch.no_grad():
            for name, (m, _, _) in ms.items():
                worst = max(
                    worst, float(np.abs(got[name][0] - m(*torch_inputs[name]).numpy()).max())
                )

        def eager(torch_inputs=torch_inputs):
            with torch.no_grad():
                for name, (m, _, _) in ms.items():
                    m(*torch_inputs[name])

        def onnxrt(inputs=inputs):
            for name, s in sessions.items():
                s.run(None, {s.get_inputs()[0].name: inputs[name][0]})

        # the two bundles alternate call by call (the same neighbours for both: the cost of
        # dynamism); the peers run in blocks of their own, so that no runtime's spinning
        # workers (PyTorch's after an eager call) slow whoever runs next
        times = round_times(
            {
                "dynamic bundle": lambda inputs=inputs: dyn.run_all(inputs),
                "static bundle": lambda b=b, inputs=inputs: static[b].run_all(inputs),
            },
            repeat,
            warmup,
        )
        times |= block_times({"pytorch eager": eager, "onnxruntime": onnxrt}, repeat, warmup)
        base = float(np.median(times["dynamic bundle"]))
        rows[b] = {
            "max_abs_err": worst,
            "arena_bytes": static[b].manifest.memory.arena_bytes,
            "times": {
                k: {
                    "median_ms": 1e3 * float(np.median(ts)),
                    "ratio_to_dynamic": float(np.median(ts)) / base,
                }
                for k, ts in times.items()
            },
        }
    return {
        "sizes": sizes,
        "bound": bound,
        "repeat": repeat,
        "rows": rows,
        "dynamic_arena_bytes": dyn.manifest.memory.arena_bytes,
        "compile_s": compile_s,
    }


def to_markdown(res: dict, command: str) -> str:
    """The RESULTS.md section of one run."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    lines = [
        f"### dynamic batch: one bundle for batch 1..{res['bound']}",
        "",
        f"`{command}` — {when}, {cpu}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {res['repeat']} rounds after warm-up. Tenants: vision "
        "(ResNet-style CNN), text (transformer encoder), mlp; run_all of all three. "
        "Ratio: contender time / dynamic bundle time (static: the cost of dynamism).",
        "",
        "| batch | dynamic ms | static ms | static / dynamic | eager ms | eager / dynamic "
        "| onnxruntime ms | ort / dynamic | max abs err | arena dynamic (at bound) "
        "| arena static |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, r in res["rows"].items():
        t = r["times"]
        lines.append(
            f"| {b} | {t['dynamic bundle']['median_ms']:.3f} "
            f"| {t['static bundle']['median_ms']:.3f} "
            f"| {t['static bundle']['ratio_to_dynamic']:.2f} "
            f"| {t['pytorch eager']['median_ms']:.3f} "
            f"| {t['pytorch eager']['ratio_to_dynamic']:.2f} "
            f"| {t['onnxruntime']['median_ms']:.3f} | {t['onnxruntime']['ratio_to_dynamic']:.2f} "
            f"| {r['max_abs_err']:.1e} | {res['dynamic_arena_bytes'] / 1024:.0f} KiB "
            f"| {r['arena_bytes'] / 1024:.0f} KiB |"
        )
    lines += [
        "",
        "Compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["compile_s"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    args = ap.parse_args(argv)
    res = run(sorted(set(args.sizes)), args.repeat, args.warmup)
    bad = [b for b, r in res["rows"].items() if r["max_abs_err"] > ATOL]
    text = to_markdown(
        res, " ".join(["python -m benchmarks.dynamic", *(sys.argv[1:] if argv is None else argv)])
    )
    print(text)
    if args.write:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
    if bad:
        print(f"numerics: dynamic bundle off by more than {ATOL} at batch {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
