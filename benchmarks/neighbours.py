"""Neighbours benchmark: the bundle, PyTorch eager and onnxruntime alone, then side by side.

    python -m benchmarks.neighbours [--set bert4] [--repeat 50] [--warmup 10] [--write]

All in ONE process, in this order:
1. alone: the bundle first (compiled and saved by a child process and loaded here, so no
   PyTorch op, hence no PyTorch thread pool, has run in this process yet; ``tvm_ffi``
   itself imports torch when it is installed), then PyTorch eager, then onnxruntime, each
   contender's rounds in one block;
2. interleaved: the three contenders round by round; then PyTorch eager and onnxruntime
   each beside the bundle alone (what the bundle does to each, without the third
   contender's threads: PyTorch's OpenMP workers, for one, spin after each op), in rounds
   that alternate the peer alone and the bundle then the peer: the ratio compares the two
   kinds of round, so the VM's drift over the run (up to 1.5x here) cancels out;
3. after torch.compile: ``torch.compile``d copies of the tenants (inductor) run, then the
   bundle runs alone again (the row is skipped, with the reason, if torch.compile fails).
Prints median ms and the ratios interleaved / alone and after-compile / alone (the goal:
at most 1.10); ``--write`` appends the table and the command to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "RESULTS.md"
THREADS = 2  # PyTorch and onnxruntime intra-op threads, as in benchmarks/run.py


def prepare(set_name: str, directory: Path) -> None:
    """Child process: compile the set, save the bundle and the example inputs under `directory`."""
    import mtcompile
    from mtcompile.models import get_set

    tenants = get_set(set_name)
    t0 = time.perf_counter()
    bundle = mtcompile.compile(tenants)
    print(f"compiled {set_name} in {time.perf_counter() - t0:.1f} s", flush=True)
    bundle.save(directory / "bundle")
    np.savez(
        directory / "inputs.npz",
        **{f"{t.name}/{i}": np.asarray(x) for t in tenants for i, x in enumerate(t.example_inputs)},
    )


def load_inputs(path: Path, names: list[str]) -> dict[str, tuple[np.ndarray, ...]]:
    """The example inputs saved by `prepare`, as ``{tenant: (array, ...)}`` in input order."""
    with np.load(path) as z:
        keys = list(z.keys())
        return {
            n: tuple(z[f"{n}/{i}"] for i in range(sum(k.startswith(f"{n}/") for k in keys)))
            for n in names
        }


def time_block(fn, repeat: int, warmup: int) -> list[float]:
    """`warmup` untimed calls, then `repeat` timed calls of `fn` (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def alternate(peer, bundle, repeat: int, warmup: int) -> tuple[list[float], list[float]]:
    """Rounds alternating `peer` alone and `bundle` then `peer`: the peer's times (seconds)
    in each kind of round, `repeat` of each after `warmup` of each."""
    for _ in range(warmup):
        peer()
        bundle()
    alone, beside = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        peer()
        alone.append(time.perf_counter() - t)
        bundle()
        t = time.perf_counter()
        peer()
        beside.append(time.perf_counter() - t)
    return alone, beside


def compiled_twins(twins: dict, torch_inputs: dict):
    """``torch.compile`` every twin and run it once; returns (runner, None) or (None, reason)."""
    import torch

    try:
        compiled = {k: torch.compile(m) for k, m in twins.items()}
        with torch.no_grad():
            for k, m in compiled.items():
                m(*torch_inputs[k])
    except Exception as e:  # inductor needs a working C++ toolchain; report, don't crash
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def run():
        with torch.no_grad():
            for k, m in compiled.items():
                m(*torch_inputs[k])

    return run, None


def run(set_name: str, repeat: int, warmup: int) -> dict:
    import mtcompile

    with tempfile.TemporaryDirectory() as tmp:
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.neighbours", "--set", set_name, "--prepare", tmp],
            cwd=Path(__file__).parent.parent,
        )
        if child.returncode:
            raise SystemExit(
                f"compiling set {set_name!r} failed in the child process "
                f"(exit {child.returncode}; its error is printed above)"
            )
        bundle = mtcompile.load(Path(tmp) / "bundle")
        inputs = load_inputs(Path(tmp) / "inputs.npz", bundle.tenant_names)
    torch_imported = "torch" in sys.modules  # by tvm_ffi's own `import torch`, if installed
    alone = {"bundle": time_block(lambda: bundle.run_all(inputs), repeat, warmup)}

    import torch

    from mtcompile.models import get_set

    from .coverage import round_times as measure  # raw times (s)
    from .run import ort_sessions, peer_runs, torch_twins

    torch.set_num_threads(THREADS)
    tenants = get_set(set_name)
    twins = torch_twins(set_name, tenants, batch=1)
    torch_inputs = {k: tuple(torch.from_numpy(x) for x in v) for k, v in inputs.items()}
    sessions = ort_sessions(tenants, twins)

    eager, onnxrt = peer_runs(tenants, twins, torch_inputs, sessions)

    contenders = {
        "bundle": lambda: bundle.run_all(inputs),
        "pytorch eager": eager,
        "onnxruntime": onnxrt,
    }
    alone["pytorch eager"] = time_block(eager, repeat, warmup)
    alone["onnxruntime"] = time_block(onnxrt, repeat, warmup)
    together = measure(contenders, repeat, warmup)
    beside = {
        k: alternate(contenders[k], contenders["bundle"], repeat, warmup)
        for k in ("pytorch eager", "onnxruntime")
    }

    after, compiled_ms = {}, None
    compiled_run, skipped = compiled_twins(twins, torch_inputs)
    if compiled_run is not None:
        compiled_ms = 1e3 * float(np.median(time_block(compiled_run, repeat, warmup)))
        after["bundle"] = time_block(contenders["bundle"], repeat, warmup)

    outs = bundle.run_all(inputs)
    with torch.no_grad():
        err = max(
            float(np.max(np.abs(np.asarray(o) - twins[name](*torch_inputs[name]).numpy())))
            for name, (o, *_) in outs.items()
        )
    med = {k: 1e3 * float(np.median(v)) for k, v in alone.items()}
    rows = {}
    for k in contenders:
        m_int = 1e3 * float(np.median(together[k]))
        m_aft = 1e3 * float(np.median(after[k])) if k in after else None
        m_bes = 1e3 * float(np.median(beside[k][1])) if k in beside else None
        m_alt = 1e3 * float(np.median(beside[k][0])) if k in beside else None
        rows[k] = {
            "alone_ms": med[k],
            "interleaved_ms": m_int,
            "interleaved_ratio": m_int / med[k],
            "beside_bundle_ms": m_bes,
            "alone_alternating_ms": m_alt,
            "beside_bundle_ratio": m_bes / m_alt if m_bes is not None else None,
            "after_compile_ms": m_aft,
            "after_compile_ratio": m_aft / med[k] if m_aft is not None else None,
        }
    return {
        "set": set_name,
        "tenants": bundle.tenant_names,
        "repeat": repeat,
        "rows": rows,
        "torch_compile_ms": compiled_ms,
        "torch_compile_skipped": skipped,
        "torch_imported_by_load": torch_imported,
        "max_abs_err": err,
    }


def to_markdown(res: dict, command: str) -> str:
    """The RESULTS.md section of one run."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    import torch

    lines = [
        f"### neighbours: {res['set']} ({', '.join(res['tenants'])})",
        "",
        f"`{command}` — {when}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {res['repeat']} rounds per "
        f"phase after warm-up. The bundle's alone phase ran before any PyTorch op "
        f"(torch imported by then: {'yes' if res['torch_imported_by_load'] else 'no'}); "
        f"bundle vs PyTorch max abs error {res['max_abs_err']:.2e}.",
        "",
        "| contender | alone ms | interleaved ms | interleaved / alone "
        "| beside the bundle only ms | beside / alone (alternating rounds) "
        "| after torch.compile ms | after / alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, r in res["rows"].items():
        aft = (
            f"{r['after_compile_ms']:.3f} | {r['after_compile_ratio']:.2f}"
            if r["after_compile_ms"] is not None
            else " | "
        )
        bes = (
            f"{r['beside_bundle_ms']:.3f} | {r['beside_bundle_ratio']:.2f}"
            if r["beside_bundle_ms"] is not None
            else " | "
        )
        lines.append(
            f"| {k} | {r['alone_ms']:.3f} | {r['interleaved_ms']:.3f} "
            f"| {r['interleaved_ratio']:.2f} | {bes} | {aft} |"
        )
    if res["torch_compile_ms"] is not None:
        lines.append(f"| torch.compile (inductor) | {res['torch_compile_ms']:.3f} | | | | | | |")
    else:
        lines += ["", f"torch.compile row skipped: {res['torch_compile_skipped']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # No `choices`: listing SETS would import torch before the bundle is timed alone.
    ap.add_argument("--set", default="bert4", help="a set of mtcompile.models.SETS")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    ap.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)  # the child's job
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.prepare:
        prepare(args.set, Path(args.prepare))
        return 0
    command = "python -m benchmarks.neighbours " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = to_markdown(run(args.set, args.repeat, args.warmup), command)
    print(text, flush=True)
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
