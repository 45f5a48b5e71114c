"""Side-by-side benchmark of a tenant set: PyTorch eager, onnxruntime, TVM per tenant, the bundle.

    python -m benchmarks.run --set heterogeneous [--n 4] [--batch 1] [--repeat 50]
    python -m benchmarks.run --set bert4 --no-ablation   # user-scale sets: bert4, mixed

Everything runs in ONE process, alternating the contenders round by round so that
machine noise hits all of them alike; medians and spreads are over those rounds and
every ratio is contender time / bundle time (above 1: the bundle is faster).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import mtcompile
from mtcompile.models import SETS, get_set, transformer_encoder
from mtcompile.models.zoo import export_onnx

RESULTS = Path(__file__).parent / "RESULTS.md"


def peer_runs(tenants, twins, torch_inputs, sessions):
    """The two peers as callables: PyTorch eager over every tenant, onnxruntime sessions."""

    def eager():
        with torch.no_grad():
            for t in tenants:
                twins[t.name](*torch_inputs[t.name])

    def onnxrt():
        for sess, feed in sessions.values():
            sess.run(None, feed)

    return eager, onnxrt


def matmul_ceiling(n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of PyTorch's n x n float32 matmul on this machine (the GEMM roofline)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times)) / 1e9


def graph_flops(graph) -> int:
    """Multiply-add FLOPs (x2) of the matmuls and convolutions of a graph."""
    from mtcompile.ir.ops import LIBRARY_CALLS

    total = 0
    for n in graph.nodes:
        op = LIBRARY_CALLS.get(n.op, n.op)  # a library call node computes its heavy op
        if op == "relax.matmul":
            a = _shape(graph, n.args[0])
            total += 2 * int(np.prod(n.ty.shape)) * a[-1]
        elif op == "relax.nn.conv2d":
            w = _shape(graph, n.args[1])
            total += 2 * int(np.prod(n.ty.shape)) * int(np.prod(w[1:]))
    return total


def _shape(graph, arg) -> tuple[int, ...]:
    from mtcompile.ir.graph import ConstRef

    if isinstance(arg, ConstRef):
        return graph.constants[arg.key].shape
    return graph.node(arg.name).ty.shape


def torch_twins(set_name: str, tenants, batch: int) -> dict[str, torch.nn.Module]:
    """A PyTorch module for every tenant (the ONNX tenant's source model for that one)."""
    twins = {}
    for t in tenants:
        if isinstance(t.model, torch.nn.Module):
            twins[t.name] = t.model
        elif set_name == "heterogeneous" and t.name == "text":
            twins[t.name] = transformer_encoder(seed=1, batch=batch, seq=16)[0]
        else:
            raise ValueError(f"no PyTorch twin for tenant {t.name!r} of set {set_name!r}")
    return twins


def ort_sessions(tenants, twins):
    """One onnxruntime session per tenant, spinning off, 2 intra-op threads (PERF_NOTES)."""
    import onnx
    import onnxruntime as ort

    sessions = {}
    for t in tenants:
        if isinstance(t.model, onnx.ModelProto):
            proto = t.model
        else:
            n_in = len(t.example_inputs)
            proto = export_onnx(twins[t.name], tuple(t.example_inputs),
                                [f"in{i}" for i in range(n_in)], ["out"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        feed = {i.name: np.asarray(x) for i, x in zip(sess.get_inputs(), t.example_inputs,
                                                       strict=True)}
        sessions[t.name] = (sess, feed)
    return sessions


def kernel_launches(bundle, entry: str, arrays) -> int:
    """Kernels (TVM or library) that one call of `entry` launches, VM builtins aside."""
    (calls,) = bundle.trace(entry, list(arrays))
    return sum(1 for symbol, _ in calls if not symbol.startswith("vm.builtin"))


def run_all_args(bundle, inputs: dict) -> list:
    """The flat argument list of the ``run_all`` entry (a shared input appears once)."""
    def position(tenant: str, name: str) -> int:
        return [s.name for s in bundle.signature(tenant).inputs].index(name)

    return [inputs[t][position(t, name)] for (t, name), *_ in bundle.manifest.run_all_inputs]


def measure(contenders: dict, repeat: int, warmup: int) -> dict[str, list[float]]:
    """Run every contender `warmup` times, then `repeat` rounds, each contender once a round."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in contenders}
    for _ in range(repeat):
        for k, fn in contenders.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def set_options(set_name: str, n: int, batch: int) -> dict:
    """Keyword options for `get_set`: ``batch``, and ``n`` where the set's factory takes it."""
    takes_n = "n" in inspect.signature(SETS[set_name]).parameters
    return {"batch": batch} | ({"n": n} if takes_n else {})


def run(set_name: str, n: int, batch: int, repeat: int, warmup: int,
        ablation: bool = True) -> dict:
    torch.set_num_threads(2)
    kw = set_options(set_name, n, batch)
    tenants = get_set(set_name, **kw)
    twins = torch_twins(set_name, tenants, batch)
    inputs = {t.name: tuple(np.asarray(x) for x in t.example_inputs) for t in tenants}
    torch_inputs = {k: tuple(torch.from_numpy(x) for x in v) for k, v in inputs.items()}

    compile_s, bundles = {}, {}
    from mtcompile.passes import DEFAULT_PIPELINE

    variants = {"bundle": DEFAULT_PIPELINE}
    for p in DEFAULT_PIPELINE if ablation else []:
        variants[f"bundle -{p}"] = [q for q in DEFAULT_PIPELINE if q != p]
    for label, passes in variants.items():
        t0 = time.perf_counter()
        bundles[label] = mtcompile.compile(tenants, passes=passes)
        compile_s[label] = time.perf_counter() - t0
    separate = {}
    t0 = time.perf_counter()
    for t in tenants:
        separate[t.name] = mtcompile.compile([t])
    compile_s["tvm separate"] = time.perf_counter() - t0
    check = bundles["bundle"].verify(inputs)
    sessions = ort_sessions(tenants, twins)

    eager, onnxrt = peer_runs(tenants, twins, torch_inputs, sessions)

    def tvm_separate():
        for name, b in separate.items():
            b.run(name, *inputs[name])

    contenders = {"pytorch eager": eager, "onnxruntime": onnxrt, "tvm separate": tvm_separate}
    for label, b in bundles.items():
        contenders[label] = lambda b=b: b.run_all(inputs)
    times = measure(contenders, repeat, warmup)
    ceiling = matmul_ceiling()
    flops = graph_flops(bundles["bundle"].graph)
    base = float(np.median(times["bundle"]))
    rows = {}
    for k, ts in times.items():
        med = float(np.median(ts))
        rows[k] = {"median_ms": 1e3 * med, "p10_ms": 1e3 * float(np.percentile(ts, 10)),
                   "p90_ms": 1e3 * float(np.percentile(ts, 90)), "ratio_to_bundle": med / base,
                   "gflops": flops / med / 1e9}
    kernels = {label: kernel_launches(b, "run_all", run_all_args(b, inputs))
               for label, b in bundles.items()}
    kernels["tvm separate"] = sum(kernel_launches(b, name, inputs[name])
                                  for name, b in separate.items())
    return {"set": set_name, "n": len(tenants), "batch": batch, "repeat": repeat,
            "tenants": [t.name for t in tenants], "rows": rows, "compile_s": compile_s,
            "kernels": kernels, "flops": flops, "ceiling_gflops": ceiling,
            "numerics_ok": check["ok"],
            "profile": bundles["bundle"].profile(inputs, repeat=10)}


def to_markdown(res: dict, command: str) -> str:
    """The RESULTS.md section of one run."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    lines = [f"### {res['set']}: {res['n']} tenants, batch {res['batch']}",
             "", f"`{command}` — {when}, {cpu}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {res['repeat']} rounds after warm-up.",
             f"Matmul ceiling measured in the same run: {res['ceiling_gflops']:.0f} GFLOP/s; "
             f"the set needs {res['flops'] / 1e6:.1f} MFLOP per run_all "
             f"({1e3 * res['flops'] / 1e9 / res['ceiling_gflops']:.3f} ms at the ceiling); "
             f"the bundle reaches {res['rows']['bundle']['gflops']:.1f} GFLOP/s, "
             f"{100 * res['rows']['bundle']['gflops'] / res['ceiling_gflops']:.1f}% of it. "
             f"Numerics within 1e-4: {'yes' if res['numerics_ok'] else 'NO'}.", "",
             "| contender | median ms | p10-p90 ms | time / bundle | GFLOP/s | % ceiling "
             "| kernels | compile s |", "|---|---|---|---|---|---|---|---|"]
    for k, r in res["rows"].items():
        compile_s = f"{res['compile_s'][k]:.2f}" if k in res["compile_s"] else ""
        lines.append(f"| {k} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} "
                     f"| {r['ratio_to_bundle']:.2f} | {r['gflops']:.1f} "
                     f"| {100 * r['gflops'] / res['ceiling_gflops']:.1f} "
                     f"| {res['kernels'].get(k, '')} | {compile_s} |")
    lines += ["", "Where the bundle's time goes (per tenant entry: share of library kernels, "
              "TVM-generated kernels, VM builtins; top calls):", ""]
    for t, p in res["profile"]["tenants"].items():
        shares = {"library": 0.0, "tvm": 0.0, "vm": 0.0}
        for k in p["kernels"]:
            kind = ("library" if k["name"].startswith(("mtcompile.native", "mtcompile.torch"))
                    else "vm" if k["name"].startswith("vm.builtin") else "tvm")
            shares[kind] += k["share"]
        top = ", ".join(f"{k['name']} x{k['calls']} {k['total_us']:.0f} us"
                        for k in p["kernels"][:4])
        lines.append(f"- {t}: {p['total_us']:.0f} us (library {100 * shares['library']:.0f}%, "
                     f"TVM {100 * shares['tvm']:.0f}%, VM {100 * shares['vm']:.0f}%); {top}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="heterogeneous", choices=[*SETS, "all"])
    ap.add_argument("--n", type=int, default=4,
                    help="tenants in same-arch / shared-backbone / bert4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-ablation", action="store_true",
                    help="skip the 'bundle -PASS' rows (one compile per pass: slow on big sets)")
    ap.add_argument("--write", action="store_true", help=f"append the tables to {RESULTS}")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    sets = list(SETS) if args.set == "all" else [args.set]
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else
                                                       __import__("sys").argv[1:])
    results, text = [], []
    for s in sets:
        print(f"benchmarking {s} ...", flush=True)
        res = run(s, args.n, args.batch, args.repeat, args.warmup, not args.no_ablation)
        results.append(res)
        text.append(to_markdown(res, command))
        print(text[-1], flush=True)
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + "\n".join(text))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
