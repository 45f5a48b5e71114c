"""Side-by-side benchmark of a tenant set: the bundle against its peers (PyTorch eager,
onnxruntime, OpenVINO, AOTInductor, torch.compile) and TVM per tenant.

    python -m benchmarks.run --set heterogeneous [--n 4] [--batch 1] [--repeat 50]
    python -m benchmarks.run --set bert4 --no-ablation   # user-scale sets: bert4, mixed
    python -m benchmarks.run --set mixed --no-ablation --peers openvino   # skip AOTI's compile
    python -m benchmarks.run --set bert4 --no-ablation --bf16   # + bfloat16 bundle, OpenVINO

Everything runs in ONE process, 2 threads each. Every peer's outputs are checked against
PyTorch eager first (max abs diff in the table; a peer off beyond the float32 tolerance
stops the run, naming it and the tenant); a peer that cannot run a tenant (openvino not
installed, AOTInductor failing to compile) gets a note instead of a time. Two columns:
each contender in blocks of its own (first calls of each block left out, blocks rotated:
compute speed) and interleaved round by round (what the neighbours' spinning workers
cost), every ratio contender time / bundle time in the same column (above 1: the bundle is
faster); the best peer / bundle, the GEMM ceiling measured in the same run, and a
per-tenant table (each tenant's entry against onnxruntime and OpenVINO, in blocks).
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
from benchmarks.coverage import TOLERANCE, block_times, blocks, round_times
from benchmarks.peers import (
    BF16_TOLERANCE,
    PEERS,
    THREADS,
    Peer,
    check,
    eager_peer,
    flat,
    openvino_peer,
    optional_peers,
    ort_peer,
)
from mtcompile.models import SETS, get_set, transformer_encoder
from mtcompile.models.zoo import export_onnx

RESULTS = Path(__file__).parent / "RESULTS.md"
BF16 = " bf16"  # the suffix of the bfloat16 contenders (`--bf16`)
BF16_OPTIONS = {"offload-library": {"precision": "bfloat16"}}


def peer_runs(tenants, twins, torch_inputs, sessions):
    """The two peers as callables: PyTorch eager over every tenant, onnxruntime sessions."""
    eager = eager_peer({t.name: twins[t.name] for t in tenants}, torch_inputs)
    return eager.run_all, ort_peer(sessions).run_all


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
    from mtcompile.ir.ops import computes, library_call

    total = 0
    for n in graph.nodes:
        op = computes(n)  # a library call node computes its heavy op
        if op == "relax.matmul":
            a = _shape(graph, n.args[0])
            total += 2 * int(np.prod(n.ty.shape)) * a[-1]
        elif op == "relax.nn.conv2d":
            w = _shape(graph, n.args[1])
            variant = getattr(library_call(n), "variant", "")
            # multiply-adds per output of the conv it computes: the winograd forms' weights
            # are transformed (a 3x3 kernel over x's C channels), the patch forms' packed
            # (a kernel the size of the stride)
            channels = _shape(graph, n.args[0])[1]
            if variant.startswith("winograd"):
                macs = 9 * channels
            elif variant.startswith("patch"):
                macs = channels * int(np.prod(library_call(n).conv.strides))
            else:
                macs = int(np.prod(w[1:]))
            total += 2 * int(np.prod(n.ty.shape)) * int(macs)
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


def onnx_protos(tenants, twins) -> dict:
    """Each tenant as ONNX: an ONNX tenant's own model, else its twin exported (legacy)."""
    import onnx

    protos = {}
    for t in tenants:
        if isinstance(t.model, onnx.ModelProto):
            protos[t.name] = t.model
        else:
            names = [f"in{i}" for i in range(len(t.example_inputs))]
            protos[t.name] = export_onnx(twins[t.name], tuple(t.example_inputs), names, ["out"])
    return protos


def ort_sessions(tenants, twins, protos: dict | None = None):
    """One onnxruntime session per tenant, spinning off, 2 intra-op threads (PERF_NOTES), on
    `protos` (default: `onnx_protos`)."""
    import onnxruntime as ort

    protos = protos if protos is not None else onnx_protos(tenants, twins)
    sessions = {}
    for t in tenants:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(
            protos[t.name].SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        feed = {
            i.name: np.asarray(x) for i, x in zip(sess.get_inputs(), t.example_inputs, strict=True)
        }
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


def set_options(set_name: str, n: int, batch: int) -> dict:
    """Keyword options for `get_set`: ``batch``, and ``n`` where the set's factory takes it."""
    takes_n = "n" in inspect.signature(SETS[set_name]).parameters
    return {"batch": batch} | ({"n": n} if takes_n else {})


def build_bundles(tenants, ablation: bool, bf16: bool = False) -> tuple[dict, dict, dict]:
    """The bundle, one bundle per pass switched off (`ablation`), with `bf16` one whose dense
    layers compute in bfloat16 ("bundle bf16"), each tenant compiled alone, and the compile
    seconds of each."""
    from mtcompile.passes import DEFAULT_PIPELINE

    variants = {"bundle": DEFAULT_PIPELINE}
    for p in DEFAULT_PIPELINE if ablation else []:
        variants[f"bundle -{p}"] = [q for q in DEFAULT_PIPELINE if q != p]
    compile_s, bundles, separate = {}, {}, {}
    for label, passes in variants.items():
        t0 = time.perf_counter()
        bundles[label] = mtcompile.compile(tenants, passes=passes)
        compile_s[label] = time.perf_counter() - t0
    if bf16:
        t0 = time.perf_counter()
        bundles["bundle" + BF16] = mtcompile.compile(tenants, pass_options=BF16_OPTIONS)
        compile_s["bundle" + BF16] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in tenants:
        separate[t.name] = mtcompile.compile([t])
    compile_s["tvm separate"] = time.perf_counter() - t0
    return bundles, separate, compile_s


def build_peers(
    tenants, twins, inputs: dict, torch_inputs: dict, chosen=PEERS, bf16: bool = False
) -> tuple[dict[str, Peer], dict[str, dict[str, float]]]:
    """Eager, onnxruntime and the `chosen` optional peers (with `bf16` and OpenVINO chosen,
    also OpenVINO at bfloat16 precision: "openvino bf16"), and each one's max |peer - eager|
    per tenant (`peers.check` raises where one is off)."""
    protos = onnx_protos(tenants, twins)
    peers = {
        "pytorch eager": eager_peer({t.name: twins[t.name] for t in tenants}, torch_inputs),
        "onnxruntime": ort_peer(ort_sessions(tenants, twins, protos)),
    }
    peers |= optional_peers(chosen, twins, torch_inputs, protos, inputs)
    if bf16 and "openvino" in chosen:
        peers["openvino" + BF16] = openvino_peer(protos, inputs, "bf16")
    reference = {k: flat(fn()) for k, fn in peers["pytorch eager"].runners.items()}
    diffs = {
        label: check(label, p, reference, BF16_TOLERANCE if label.endswith(BF16) else TOLERANCE)
        for label, p in peers.items()
        if label != "pytorch eager"
    }
    return peers, diffs


def contenders_of(
    peers: dict[str, Peer], bundles: dict, separate: dict, inputs: dict
) -> tuple[dict, dict[str, str]]:
    """The set-level calls of every contender that runs every tenant, and a note for each
    peer that does not (it gets no time)."""
    contenders, notes = {}, {}
    for label, peer in peers.items():
        if peer.notes:
            notes[label] = peer.note()
        else:
            contenders[label] = peer.run_all

    def tvm_separate():
        for name, b in separate.items():
            b.run(name, *inputs[name])

    contenders["tvm separate"] = tvm_separate
    for label, b in bundles.items():
        contenders[label] = lambda b=b: b.run_all(inputs)
    return contenders, notes


def spread(times: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile of times (s), in ms."""
    return {
        "median_ms": 1e3 * float(np.median(times)),
        "p10_ms": 1e3 * float(np.percentile(times, 10)),
        "p90_ms": 1e3 * float(np.percentile(times, 90)),
    }


def rows_of(blocked: dict, interleaved: dict, flops: int) -> dict[str, dict]:
    """Per contender: blocks (median, p10, p90, / bundle, GFLOP/s) and interleaved (median,
    / bundle)."""
    base, base_int = np.median(blocked["bundle"]), np.median(interleaved["bundle"])
    rows = {}
    for k, ts in blocked.items():
        med, med_int = float(np.median(ts)), float(np.median(interleaved[k]))
        rows[k] = spread(ts) | {
            "ratio_to_bundle": med / base,
            "gflops": flops / med / 1e9,
            "interleaved_ms": 1e3 * med_int,
            "interleaved_ratio": med_int / base_int,
        }
    return rows


def per_tenant(
    bundles: dict, peers: dict[str, Peer], inputs: dict, repeat: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Per tenant, median ms in blocks of the bundle's entry, onnxruntime and OpenVINO (and
    the bfloat16 bundle and OpenVINO where there are)."""
    table = {}
    for name in inputs:
        contenders = {
            label: lambda b=bundles[label], name=name: b.run(name, *inputs[name])
            for label in ("bundle", "bundle" + BF16)
            if label in bundles
        }
        for label in ("onnxruntime", "openvino", "openvino" + BF16):
            if label in peers and name in peers[label].runners:
                contenders[label] = peers[label].runners[name]
        table[name] = blocks(contenders, repeat, warmup)
    return table


def best_peer(rows: dict[str, dict], peers) -> tuple[str, float] | None:
    """The float32 peer with the lowest median in blocks and its time / the bundle's."""
    timed = [k for k in peers if k in rows and not k.endswith(BF16)]
    if not timed:
        return None
    best = min(timed, key=lambda k: rows[k]["median_ms"])
    return best, rows[best]["ratio_to_bundle"]


def run(
    set_name: str,
    n: int,
    batch: int,
    repeat: int,
    warmup: int,
    ablation: bool = True,
    chosen=PEERS,
    bf16: bool = False,
) -> dict:
    """Compile the set, build and check the peers, time everything in blocks and
    interleaved, then per tenant; the results as one dict (`to_markdown` prints it). With
    `bf16`, also the bundle and OpenVINO computing their dense layers in bfloat16."""
    torch.set_num_threads(THREADS)
    tenants = get_set(set_name, **set_options(set_name, n, batch))
    twins = torch_twins(set_name, tenants, batch)
    inputs = {t.name: tuple(np.asarray(x) for x in t.example_inputs) for t in tenants}
    torch_inputs = {k: tuple(torch.from_numpy(x) for x in v) for k, v in inputs.items()}
    bundles, separate, compile_s = build_bundles(tenants, ablation, bf16)
    numerics_ok = bundles["bundle"].verify(inputs)["ok"]
    bf16_ok = bundles["bundle" + BF16].verify(inputs)["ok"] if bf16 else None
    peers, diffs = build_peers(tenants, twins, inputs, torch_inputs, chosen, bf16)
    compile_s |= {k: p.compile_s for k, p in peers.items() if k in PEERS}
    contenders, notes = contenders_of(peers, bundles, separate, inputs)
    flops = graph_flops(bundles["bundle"].graph)
    rows = rows_of(
        block_times(contenders, repeat, warmup), round_times(contenders, repeat, warmup), flops
    )
    kernels = {
        label: kernel_launches(b, "run_all", run_all_args(b, inputs))
        for label, b in bundles.items()
    }
    kernels["tvm separate"] = sum(
        kernel_launches(b, name, inputs[name]) for name, b in separate.items()
    )
    return {
        "set": set_name,
        "n": len(tenants),
        "batch": batch,
        "repeat": repeat,
        "tenants": [t.name for t in tenants],
        "rows": rows,
        "notes": notes,
        "max_abs_diff": diffs,
        "compile_s": compile_s,
        "kernels": kernels,
        "flops": flops,
        "ceiling_gflops": matmul_ceiling(),
        "numerics_ok": numerics_ok,
        "bf16_numerics_ok": bf16_ok,
        "best_peer": best_peer(rows, peers),
        "per_tenant": per_tenant(bundles, peers, inputs, repeat, warmup),
        "profile": bundles["bundle"].profile(inputs, repeat=10),
    }


def _header(res: dict, command: str) -> list[str]:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    bundle_gflops = res["rows"]["bundle"]["gflops"]
    return [
        f"### {res['set']}: {res['n']} tenants, batch {res['batch']}",
        "",
        f"`{command}` — {when}, {cpu}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {THREADS} threads each, {res['repeat']} timed calls "
        "per contender in each column after warm-up.",
        f"Matmul ceiling measured in the same run: {res['ceiling_gflops']:.0f} GFLOP/s; "
        f"the set needs {res['flops'] / 1e6:.1f} MFLOP per run_all as direct matmuls and "
        f"convs ({1e3 * res['flops'] / 1e9 / res['ceiling_gflops']:.3f} ms at the ceiling; "
        "Winograd's convs do fewer, so GFLOP/s below counts the direct form's); "
        f"the bundle reaches {bundle_gflops:.1f} GFLOP/s in blocks, "
        f"{100 * bundle_gflops / res['ceiling_gflops']:.1f}% of it. "
        f"Bundle numerics within 1e-4: {'yes' if res['numerics_ok'] else 'NO'}.",
        "",
        "Blocks: each contender in blocks of its own, first calls of each block left out, "
        "blocks rotated (compute speed). Interleaved: every contender once a round (what "
        "the neighbours' spinning workers cost whoever runs next). Ratios: time / the "
        "bundle's time in the same column (above 1: the bundle is faster).",
        "",
    ]


def _max_diff(res: dict, label: str) -> str:
    if label == "pytorch eager":
        return "reference"
    diffs = res["max_abs_diff"].get(label)
    return f"{max(diffs.values()):.1e}" if diffs else ""


def _rows_table(res: dict) -> list[str]:
    lines = [
        "| contender | blocks median ms | p10-p90 ms | / bundle | interleaved ms "
        "| / bundle | GFLOP/s | % ceiling | kernels | compile s | max abs diff vs eager "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in res["rows"].items():
        compile_s = f"{res['compile_s'][k]:.2f}" if k in res["compile_s"] else ""
        lines.append(
            f"| {k} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} "
            f"| {r['ratio_to_bundle']:.2f} | {r['interleaved_ms']:.3f} "
            f"| {r['interleaved_ratio']:.2f} | {r['gflops']:.1f} "
            f"| {100 * r['gflops'] / res['ceiling_gflops']:.1f} "
            f"| {res['kernels'].get(k, '')} | {compile_s} | {_max_diff(res, k)} | |"
        )
    for k, note in res["notes"].items():
        lines.append(f"| {k} |" + " |" * 10 + f" {_max_diff(res, k)} | not timed: {note} |")
    return lines


def _best_line(res: dict) -> str:
    if not res["best_peer"]:
        return "No peer was timed."
    label, ratio = res["best_peer"]
    return (
        f"**Best peer (blocks): {label}, {res['rows'][label]['median_ms']:.3f} ms against "
        f"the bundle's {res['rows']['bundle']['median_ms']:.3f} ms: peer / bundle = "
        f"{ratio:.2f}** (above 1: the bundle is faster); interleaved, the same peer / "
        f"bundle = {res['rows'][label]['interleaved_ratio']:.2f}."
    )


def _tenant_table(res: dict) -> list[str]:
    bf16 = any("bundle" + BF16 in ms for ms in res["per_tenant"].values())
    pairs = [("onnxruntime", "bundle"), ("openvino", "bundle")]  # (peer, the bundle it meets)
    pairs += [("openvino" + BF16, "bundle" + BF16)] if bf16 else []
    head = "| tenant | bundle ms |" + (" bundle bf16 ms |" if bf16 else "")
    head += "".join(f" {p} ms | / {b} |" for p, b in pairs)
    lines = [
        "Per tenant, in blocks: the bundle's entry (`bundle.run(tenant, ...)`) against "
        "the peers' session for that tenant (ms; peer / bundle"
        + (", a bfloat16 peer / the bfloat16 bundle" if bf16 else "")
        + ").",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for name, ms in res["per_tenant"].items():
        cells = [f"{ms[b]:.3f}" for b in ("bundle", "bundle" + BF16) if b in ms]
        for peer, b in pairs:
            cells += [f"{ms[peer]:.3f}", f"{ms[peer] / ms[b]:.2f}"] if peer in ms else ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _bf16_line(res: dict) -> list[str]:
    rows = res["rows"]
    if "bundle" + BF16 not in rows:
        return []
    mine = rows["bundle" + BF16]["median_ms"]
    line = (
        f'**bfloat16 kernels** (offload-library `precision="bfloat16"`; numerics '
        f"within {BF16_TOLERANCE:g} of max|source|: "
        f"{'yes' if res['bf16_numerics_ok'] else 'NO'}): the bundle {mine:.3f} ms"
    )
    if "openvino" + BF16 in rows:
        ov = rows["openvino" + BF16]["median_ms"]
        line += f", OpenVINO at bf16 precision {ov:.3f} ms: OpenVINO bf16 / bundle bf16 = {ov / mine:.2f}"
    if res["best_peer"]:
        label = res["best_peer"][0]
        line += (
            f"; the best float32 peer ({label}) / bundle bf16 = "
            f"{rows[label]['median_ms'] / mine:.2f}"
        )
    return [line + ".", ""]


def _profile_lines(res: dict) -> list[str]:
    lines = [
        "Where the bundle's time goes (per tenant entry: share of library kernels, "
        "TVM-generated kernels, VM builtins; top calls):",
        "",
    ]
    for t, p in res["profile"]["tenants"].items():
        shares = {"library": 0.0, "tvm": 0.0, "vm": 0.0}
        for k in p["kernels"]:
            kind = (
                "library"
                if k["name"].startswith(("mtcompile.native", "mtcompile.torch"))
                else "vm"
                if k["name"].startswith("vm.builtin")
                else "tvm"
            )
            shares[kind] += k["share"]
        top = ", ".join(
            f"{k['name']} x{k['calls']} {k['total_us']:.0f} us" for k in p["kernels"][:4]
        )
        lines.append(
            f"- {t}: {p['total_us']:.0f} us (library {100 * shares['library']:.0f}%, "
            f"TVM {100 * shares['tvm']:.0f}%, VM {100 * shares['vm']:.0f}%); {top}"
        )
    return lines


def to_markdown(res: dict, command: str) -> str:
    """The RESULTS.md section of one run."""
    lines = (
        _header(res, command)
        + _rows_table(res)
        + ["", _best_line(res), ""]
        + _bf16_line(res)
        + _tenant_table(res)
        + [""]
        + _profile_lines(res)
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="heterogeneous", choices=[*SETS, "all"])
    ap.add_argument(
        "--n", type=int, default=4, help="tenants in same-arch / shared-backbone / bert4"
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip the 'bundle -PASS' rows (one compile per pass: slow on big sets)",
    )
    ap.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"optional peers, comma-separated (default: all of {', '.join(PEERS)}; empty: none)",
    )
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="also time a bundle whose dense layers compute in bfloat16, and OpenVINO at "
        "bf16 precision (CPUs with AVX-512 BF16 run both at about twice the float32 rate)",
    )
    ap.add_argument("--write", action="store_true", help=f"append the tables to {RESULTS}")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = ap.parse_args(argv)
    chosen = [p for p in args.peers.split(",") if p]
    if set(chosen) - set(PEERS):
        ap.error(f"unknown peers {sorted(set(chosen) - set(PEERS))}; known: {', '.join(PEERS)}")
    warnings.filterwarnings("ignore")
    sets = list(SETS) if args.set == "all" else [args.set]
    command = "python -m benchmarks.run " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    results, text = [], []
    for s in sets:
        print(f"benchmarking {s} ...", flush=True)
        res = run(
            s, args.n, args.batch, args.repeat, args.warmup, not args.no_ablation, chosen, args.bf16
        )
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
