"""Coverage of the real-model zoo: does each architecture compile, match, and run fast?

    python -m benchmarks.coverage [--models bert,gpt2] [--repeat 30] [--write]

Per model of `mtcompile.models.hf.REAL_ZOO` (alone in a bundle, default pipeline, batch 1):
compiled or the error; error relative to the output's scale (max|bundle - eager| /
max|eager|); compile seconds; the medians of the bundle's entry, PyTorch eager and
onnxruntime (on the model's dynamo ONNX export) in this one process (2 threads each,
onnxruntime's spinning off), each in blocks of its own for compute speed and interleaved
round by round for what neighbours cost; and the share of the bundle's time
spent in TVM-generated kernels (masks, rotary embeddings, normalizations: where the
native library does not run). Ratios are peer time / bundle time (above 1: the bundle is
faster). A total line gives compiled-and-matching / total and the geomeans.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch

import mtcompile
from mtcompile.models.hf import REAL_ZOO, real_model

RESULTS = Path(__file__).parent / "RESULTS.md"
TOLERANCE = 1e-4  # max error relative to max|eager|, as verify() uses for float32


def ort_session(module, x: torch.Tensor):
    """onnxruntime on the model's dynamo ONNX export (opset 18), or (None, why)."""
    import onnxruntime as ort

    try:
        with (
            warnings.catch_warnings(),
            redirect_stdout(io.StringIO()),
            redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            proto = torch.onnx.export(
                module, (x,), dynamo=True, opset_version=18, verbose=False
            ).model_proto
    except Exception as e:  # the exporter's failure: a missing column, not a crash
        return None, f"export: {type(e).__name__}"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return (lambda: sess.run(None, feed)), None


def tvm_kernel_share(bundle, name: str, x: np.ndarray) -> float:
    """Share of the entry's kernel time spent in TVM-generated kernels (not library calls,
    not VM builtins)."""
    prof = bundle.profile({name: (x,)}, repeat=5, warmup=2)["tenants"][name]
    total = sum(k["total_us"] for k in prof["kernels"]) or 1.0
    tvm = sum(
        k["total_us"]
        for k in prof["kernels"]
        if not k["name"].startswith(("mtcompile", "vm.builtin"))
    )
    return tvm / total


SETTLE_S = 0.3  # before each block: the last runtime's workers stop spinning (libgomp, TBB)


def block_times(
    contenders: dict, repeat: int, warmup: int, passes: int = 3
) -> dict[str, list[float]]:
    """Times (s) of contenders each run in blocks of its own (a pause of SETTLE_S, then
    `warmup` calls left out at the start of every block), the blocks' order rotated over
    `passes` passes: compute speed, without what one runtime's spinning threads cost the next
    (PyTorch's OpenMP and OpenVINO's TBB workers spin on for tens of ms after a call)."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for p in range(passes):
        for k in names[p % len(names) :] + names[: p % len(names)]:
            fn = contenders[k]
            time.sleep(SETTLE_S)
            for _ in range(warmup):
                fn()
            for _ in range(max(1, repeat // passes)):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return times


def round_times(contenders: dict, repeat: int, warmup: int, before=None) -> dict[str, list[float]]:
    """Times (s) of contenders run round by round (each once a round): what neighbours
    cost, since PyTorch's OpenMP workers spin for a while after each eager call. `before`
    (untimed) runs ahead of each timed call."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeat):
        for k, fn in contenders.items():
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of each contender's times, in ms."""
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def blocks(contenders: dict, repeat: int, warmup: int, passes: int = 3) -> dict[str, float]:
    """Medians (ms) of `block_times`: each contender in blocks of its own."""
    return medians_ms(block_times(contenders, repeat, warmup, passes))


def measure(contenders: dict, repeat: int, warmup: int, before=None) -> dict[str, float]:
    """Medians (ms) of `round_times`: contenders interleaved round by round."""
    return medians_ms(round_times(contenders, repeat, warmup, before))


def publish(text: str, data, write: bool, json_path: str | None) -> None:
    """Print a benchmark's table; append it to RESULTS.md (`write`); dump `data` as JSON."""
    print(text)
    if write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=1))


def run_model(name: str, repeat: int, warmup: int) -> dict:
    """One zoo model: compile, compare with eager, time bundle / eager / onnxruntime."""
    module, (x,) = real_model(name)
    row: dict = {"model": name, "family": REAL_ZOO[name].family}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundle = mtcompile.compile([mtcompile.Tenant(name, module, example_inputs=(x,))])
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    row["compile_s"] = time.perf_counter() - t0
    with torch.no_grad():
        want = module(x).numpy()
    got = bundle.run(name, x)[0]
    scale = float(np.abs(want).max())
    row["rel_err"] = float(np.abs(got - want).max()) / scale if scale else float("inf")
    row["match"] = row["rel_err"] <= TOLERANCE
    xn = x.numpy()

    def eager():
        with torch.no_grad():
            module(x)

    contenders = {"bundle": lambda: bundle.run(name, xn), "eager": eager}
    ort_run, why = ort_session(module, x)
    if ort_run is not None:
        contenders["onnxruntime"] = ort_run
    else:
        row["ort_error"] = why
    row["ms"] = blocks(contenders, repeat, warmup)
    row["interleaved_ms"] = measure(contenders, repeat, warmup)
    row["tvm_share"] = tvm_kernel_share(bundle, name, xn)
    return row


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def totals(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("match")]
    eager = [r["ms"]["eager"] / r["ms"]["bundle"] for r in ok]
    ort = [r["ms"]["onnxruntime"] / r["ms"]["bundle"] for r in ok if "onnxruntime" in r["ms"]]
    return {
        "matching": len(ok),
        "total": len(rows),
        "eager_geomean": geomean(eager),
        "ort_geomean": geomean(ort),
        "slower_than_eager": [r["model"] for r in ok if r["ms"]["eager"] < r["ms"]["bundle"]],
    }


def _interleaved(row: dict) -> str:
    ms = row.get("interleaved_ms")
    if not ms:
        return "-"
    return " / ".join(f"{ms[k]:.3f}" for k in ("bundle", "eager", "onnxruntime") if k in ms)


def to_markdown(rows: list[dict], command: str) -> str:
    tot = totals(rows)
    cpu = platform.processor() or platform.machine()
    lines = [
        f"## Real-model coverage ({datetime.date.today()}, {cpu}, {os.cpu_count()} cores)",
        "",
        f"`{command}`",
        "",
        "Each model alone, default pipeline, batch 1, 2 threads each, one process. "
        "Compute speed: medians of each contender in blocks of its own (blocks "
        "rotated); eager/bundle and ORT/bundle above 1: the bundle is faster. "
        "Interleaved: the medians of rounds of bundle, eager, ORT (each contender "
        "runs while PyTorch's OpenMP workers still spin after the eager call: what "
        "that neighbour costs). TVM share: the bundle's kernel time in "
        "TVM-generated kernels.",
        "",
        "| model | family | result | rel. error | compile s | bundle ms | eager ms | "
        "ORT ms | eager/bundle | ORT/bundle | interleaved: bundle / eager / ORT ms | "
        "TVM share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['family']} | **{r['error'][:120]}** |" + " |" * 9)
            continue
        ms = r["ms"]
        ort = ms.get("onnxruntime")
        ort_ratio = f"{ort / ms['bundle']:.2f}" if ort else "-"
        lines.append(
            f"| {r['model']} | {r['family']} | {'ok' if r['match'] else 'MISMATCH'} | "
            f"{r['rel_err']:.1e} | {r['compile_s']:.1f} | {ms['bundle']:.3f} | "
            f"{ms['eager']:.3f} | {f'{ort:.3f}' if ort else r.get('ort_error', '-')} | "
            f"{ms['eager'] / ms['bundle']:.2f} | "
            f"{ort_ratio} | {_interleaved(r)} | {100 * r['tvm_share']:.0f}% |"
        )
    lines += [
        "",
        f"**Compiled and matching: {tot['matching']} / {tot['total']}**; geomean "
        f"eager/bundle **{tot['eager_geomean']:.2f}**, ORT/bundle "
        f"**{tot['ort_geomean']:.2f}**; slower than eager: "
        f"{', '.join(tot['slower_than_eager']) or 'none'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated zoo names (default: the whole zoo)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    names = args.models.split(",") if args.models else list(REAL_ZOO)
    unknown = sorted(set(names) - set(REAL_ZOO))
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(REAL_ZOO)}")
    command = "python -m benchmarks.coverage " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    rows = []
    for name in names:
        rows.append(run_model(name, args.repeat, args.warmup))
        r = rows[-1]
        status = r.get("error") or (
            f"{'ok' if r['match'] else 'MISMATCH'} rel_err "
            f"{r['rel_err']:.1e}, bundle {r['ms']['bundle']:.3f} ms, "
            f"eager {r['ms']['eager']:.3f} ms, ORT "
            f"{r['ms'].get('onnxruntime', float('nan')):.3f} ms"
        )
        print(f"{name:<16} {status}", flush=True)
    publish(to_markdown(rows, command), rows, args.write, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
