"""A busy host: how much each runtime slows when other processes, or other runtimes' pools
in the same process, compete for the cores.

    python -m benchmarks.contention [--set mixed] [--repeat 40] [--write]

For 0, 1 and 2 busy processes (``python -c "while True: pass"``, started here, killed after
each step) the bundle's ``run_all`` and onnxruntime (one session per tenant, 2 threads,
spinning off) are timed round by round in this one process; their slowdown is the median
under load / the median with 0 busy processes. Then the same with PyTorch eager run right
before each call (its OpenMP workers spin after its ops: the "other runtime's pool in the
process" case), and last with the set's OpenVINO compiled models (`benchmarks.peers`,
2 threads, fp32) run right before each call: OpenVINO's pool in the process (built only
then, so that the earlier conditions run without it; a note says why if openvino is
missing). Also the thread count each picks under ``taskset -c 0`` and under a CPU
quota (read by `mtcompile.runtime.cpu.usable_cores`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import mtcompile
from benchmarks.coverage import RESULTS, measure, publish
from benchmarks.peers import openvino_peer
from benchmarks.run import onnx_protos, ort_sessions, peer_runs, set_options, torch_twins
from mtcompile.models import SETS, get_set

BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end: pass"  # stops by itself


def busy(n: int) -> list[subprocess.Popen]:
    """`n` processes that keep a core busy (at most 10 minutes each)."""
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def threads_chosen() -> dict[str, int]:
    """The pool size a fresh process picks by default, alone and under ``taskset -c 0``."""
    code = "from mtcompile.runtime.threads import configure; print(configure().pool)"
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = {
        "default": int(
            subprocess.run(
                [sys.executable, "-c", code], env=env, text=True, capture_output=True, check=True
            ).stdout.split()[-1]
        )
    }
    first = sorted(os.sched_getaffinity(0))[0]
    pinned = subprocess.run(
        ["taskset", "-c", str(first), sys.executable, "-c", code],
        env=env,
        text=True,
        capture_output=True,
    )
    out["taskset -c 0"] = int(pinned.stdout.split()[-1]) if pinned.returncode == 0 else -1
    return out


# a child process: the saved bundle and the ONNX tenants with 1 thread each, quiet, timed
# round by round as `measure` does (argv: the folder `one_thread` wrote, repeat, warmup)
ONE_THREAD = r"""
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, onnxruntime as ort, mtcompile
from benchmarks.coverage import measure
folder, repeat, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
z = np.load(os.path.join(folder, "inputs.npz"))
inputs = {}
for k in sorted(z.files, key=lambda k: (k.split(":")[0], int(k.split(":")[1]))):
    inputs.setdefault(k.split(":")[0], []).append(z[k])
bundle = mtcompile.load(os.path.join(folder, "bundle"))
sessions = []
for name, xs in inputs.items():
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(os.path.join(folder, name + ".onnx"), opts)
    sessions.append((sess, {i.name: x for i, x in zip(sess.get_inputs(), xs)}))
contenders = {
    "bundle": lambda: bundle.run_all(inputs),
    "onnxruntime": lambda: [s.run(None, f) for s, f in sessions],
}
print(json.dumps(measure(contenders, repeat, warmup)))
"""


def one_thread(bundle, protos: dict, inputs: dict, repeat: int, warmup: int) -> dict:
    """The bundle's run_all and onnxruntime with one thread each, quiet (a child process with
    ``TVM_NUM_THREADS=1``): with 2 busy processes beside it, each of a runtime's 2 threads
    gets half a core, so this is about the best it can do there (the fair share)."""
    with tempfile.TemporaryDirectory() as d:
        bundle.save(os.path.join(d, "bundle"))
        for name, proto in protos.items():
            with open(os.path.join(d, name + ".onnx"), "wb") as f:
                f.write(proto.SerializeToString())
        np.savez(
            os.path.join(d, "inputs.npz"),
            **{f"{t}:{i}": x for t, xs in inputs.items() for i, x in enumerate(xs)},
        )
        env = {**os.environ, "TVM_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-c", ONE_THREAD, d, str(repeat), str(warmup)],
            env=env,
            text=True,
            capture_output=True,
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(set_name: str, repeat: int, warmup: int) -> dict:
    torch.set_num_threads(2)
    tenants = get_set(set_name, **set_options(set_name, 4, 1))
    twins = torch_twins(set_name, tenants, 1)
    inputs = {t.name: tuple(np.asarray(x) for x in t.example_inputs) for t in tenants}
    torch_inputs = {k: tuple(torch.from_numpy(x) for x in v) for k, v in inputs.items()}
    bundle = mtcompile.compile(tenants)
    protos = onnx_protos(tenants, twins)
    eager, onnxrt = peer_runs(tenants, twins, torch_inputs, ort_sessions(tenants, twins, protos))
    contenders = {"bundle": lambda: bundle.run_all(inputs), "onnxruntime": onnxrt}
    alone = one_thread(bundle, protos, inputs, repeat, warmup)
    table: dict[str, dict[str, float]] = {}
    for n in (0, 1, 2):
        procs = busy(n)
        try:
            time.sleep(0.2)
            table[f"{n} busy"] = measure(contenders, repeat, warmup)
        finally:
            stop(procs)
    table["1 thread, quiet"] = alone
    table["after eager"] = measure(contenders, repeat, warmup, before=eager)
    notes = {}
    openvino = openvino_peer(protos, inputs)  # its pool starts here, after the rest
    if openvino.notes:
        notes["after OpenVINO"] = openvino.note()
    else:
        table["after OpenVINO"] = measure(contenders, repeat, warmup, before=openvino.run_all)
    return {
        "set": set_name,
        "repeat": repeat,
        "ms": table,
        "notes": notes,
        "threads": threads_chosen(),
    }


def to_markdown(res: dict, command: str) -> str:
    base = res["ms"]["0 busy"]
    cpu = platform.processor() or platform.machine()
    lines = [
        f"## Contention: {res['set']} ({datetime.date.today()}, {cpu}, {os.cpu_count()} cores)",
        "",
        f"`{command}`",
        "",
        "Median ms of `run_all` / onnxruntime over all tenants, round by round in one "
        "process; slowdown = median / median with 0 busy processes. 'after eager' / "
        "'after OpenVINO': that runtime ran the set right before each timed call (its "
        "pool in the process). '1 thread, quiet': each with one thread, in a process of its "
        "own: with 2 busy processes a runtime's 2 threads get one core between them, so "
        "that row's slowdown is about the least it can have there (the better a runtime "
        "scales to 2 threads, the larger it is).",
        "",
        "| condition | bundle ms | slowdown | onnxruntime ms | slowdown |",
        "|---|---|---|---|---|",
    ]
    for cond, ms in res["ms"].items():
        lines.append(
            f"| {cond} | {ms['bundle']:.3f} | {ms['bundle'] / base['bundle']:.2f} | "
            f"{ms['onnxruntime']:.3f} | "
            f"{ms['onnxruntime'] / base['onnxruntime']:.2f} |"
        )
    for cond, note in res.get("notes", {}).items():
        lines.append(f"| {cond} | not run: {note} | | | |")
    t = res["threads"]
    lines += [
        "",
        f"Threads chosen by default: {t['default']}; under `taskset -c 0`: {t['taskset -c 0']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="mixed", choices=list(SETS))
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    command = "python -m benchmarks.contention " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    res = run(args.set, args.repeat, args.warmup)
    publish(to_markdown(res, command), res, args.write, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
