"""Resident memory and start-up of a fresh process that loads a tenant set and runs it once:
the bundle through the Python runtime (lean: TVM's runtime library only, as `mtcompile.load`
runs; and with tvm and torch imported first, as the runtime did before it was lean) and
through the C++ driver (`mtcompile-run`), against onnxruntime sessions and PyTorch eager
(TorchScript files) for the same models.

    python -m benchmarks.footprint [--set all|heterogeneous|...] [--write]

Each contender runs in its own process, one after the other: peak resident set
(``ru_maxrss`` of that child, from ``wait4``), the wall time from spawning it to its exit
(interpreter or program start, imports, loading, one run of every tenant), and, as the child
reports it, the load time and the first call's time. Every contender gets 2 threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mtcompile
from mtcompile.driver import command
from mtcompile.models import SETS, get_set
from mtcompile.models.zoo import export_onnx
from mtcompile.tools.verify import seeded_run_all_inputs

from .run import torch_twins

RESULTS = Path(__file__).parent / "RESULTS.md"

_PYTHON_BUNDLE = """
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
import json, sys, time
t0 = time.perf_counter()
# PRELUDE
import numpy as np
import mtcompile
b = mtcompile.load(sys.argv[1], threads=2)
z = np.load(sys.argv[2])
inputs = {t: [z[f"{t}.{i:02d}"] for i in range(len(b.manifest.tenants[t].inputs))]
          for t in b.tenant_names}
t1 = time.perf_counter()
b.run_all(inputs)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "first_call_s": t2 - t1, "peak_rss_kib": peak(),
                  "torch_imported": "torch" in sys.modules, "tvm_imported": "tvm" in sys.modules}))
"""

_ORT = """
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
import json, sys, time
t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
z = np.load(sys.argv[2])
runs = []
for path in sys.argv[3:]:
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = 2, 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    t = path.rsplit("/", 1)[1][:-5]
    runs.append((s, {i.name: z[f"{t}.{j:02d}"] for j, i in enumerate(s.get_inputs())}))
t1 = time.perf_counter()
for s, feed in runs:
    s.run(None, feed)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "first_call_s": t2 - t1, "peak_rss_kib": peak()}))
"""

_EAGER = """
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
torch.set_num_threads(2)
z = np.load(sys.argv[2])
runs = []
for path in sys.argv[3:]:
    m = torch.jit.load(path)
    t = path.rsplit("/", 1)[1][:-3]
    runs.append((m, [torch.from_numpy(z[k]) for k in sorted(z.files) if k.rsplit(".", 1)[0] == t]))
t1 = time.perf_counter()
with torch.no_grad():
    for m, xs in runs:
        m(*xs)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "first_call_s": t2 - t1, "peak_rss_kib": peak()}))
"""


def _measure(cmd: list[str]) -> dict:
    """Wall seconds of one child process and what it printed: its load and first-call times
    and its peak resident set (VmHWM, which exec resets; rusage's ru_maxrss would carry the
    forking parent's)."""
    t = time.perf_counter()
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{res.stderr[-2000:]}")
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    return {"rss_mib": rep.pop("peak_rss_kib") / 1024, "wall_s": wall, **rep}


def run(set_name: str) -> dict:
    tenants = get_set(set_name)
    bundle = mtcompile.compile(tenants, threads=2)
    inputs = seeded_run_all_inputs(bundle)
    twins = torch_twins(set_name, tenants, 1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        saved = bundle.save(d / "bundle")
        (d / "in").mkdir()
        flat = {}
        for t in bundle.tenant_names:
            for i, (io, a) in enumerate(
                zip(bundle.manifest.tenants[t].inputs, inputs[t], strict=True)
            ):
                np.save(d / "in" / f"{t}.{io.name}.npy", a)
                flat[f"{t}.{i:02d}"] = a
        np.savez(d / "inputs.npz", **flat)
        onnx_files, ts_files = [], []
        for t in tenants:
            xs = tuple(torch.from_numpy(a) for a in inputs[t.name])
            proto = export_onnx(twins[t.name], xs, [f"in{i}" for i in range(len(xs))], ["out"])
            onnx_files.append(str(d / f"{t.name}.onnx"))
            Path(onnx_files[-1]).write_bytes(proto.SerializeToString())
            with torch.no_grad():
                ts = torch.jit.trace(twins[t.name].eval(), xs, check_trace=False)
            ts_files.append(str(d / f"{t.name}.pt"))
            ts.save(ts_files[-1])
        (d / "out").mkdir()
        npz = str(d / "inputs.npz")
        return {
            "set": set_name,
            "tenants": bundle.tenant_names,
            "contenders": {
                "mtcompile, Python runtime (lean)": _measure(
                    [sys.executable, "-c", _PYTHON_BUNDLE, str(saved), npz]
                ),
                "mtcompile, Python runtime, tvm + torch imported": _measure(
                    [
                        sys.executable,
                        "-c",
                        _PYTHON_BUNDLE.replace("# PRELUDE", "import torch, tvm"),
                        str(saved),
                        npz,
                    ]
                ),
                "mtcompile-run (C++ driver)": _measure(
                    command(saved, "run_all", d / "in", d / "out", threads=2, timing=True)
                ),
                "onnxruntime": _measure([sys.executable, "-c", _ORT, str(saved), npz, *onnx_files]),
                "pytorch eager (TorchScript)": _measure(
                    [sys.executable, "-c", _EAGER, str(saved), npz, *ts_files]
                ),
            },
        }


def to_markdown(results: list[dict]) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sets = " ".join(r["set"] for r in results)
    lines = [
        f"### footprint: a fresh process loads and runs each set once ({sets})",
        "",
        f"`python -m benchmarks.footprint --set ...` — {stamp}. Peak RSS of the process; "
        "start to exit: spawn to exit (imports, load, one run of every tenant); load and "
        "first call as the process times them.",
        "",
        "| set | contender | peak RSS MiB | start to exit s | load s | first call ms | imported |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, c in r["contenders"].items():
            imported = ", ".join(k for k in ("tvm", "torch") if c.get(f"{k}_imported")) or (
                "neither tvm nor torch" if "tvm_imported" in c else ""
            )
            lines.append(
                f"| {r['set']} | {name} | {c['rss_mib']:.0f} | {c['wall_s']:.2f} | "
                f"{c['load_s']:.2f} | {c['first_call_s'] * 1e3:.1f} | {imported} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="all", choices=[*SETS, "all"])
    ap.add_argument("--write", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args(argv)
    names = list(SETS) if args.set == "all" else [args.set]
    text = to_markdown([run(s) for s in names])
    print(text)
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
