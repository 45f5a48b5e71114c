"""Memory of a bundle: the planned arena against its lower bound, TVM's own plan, no
planning, and the tenants compiled separately; resident memory measured in fresh
processes; run_all time with and without the arena, side by side in one process.

    python -m benchmarks.memory --set all [--batch 1] [--repeat 50] [--write]

Variants: **arena** (default pipeline: plan-memory, greedy by size), **tvm plan**
(plan-memory off: TVM's StaticPlanBlockMemory plans every intermediate), **naive**
(plan-memory with strategy naive: every intermediate in bytes of its own). RSS growth:
what the resident set of a fresh process grows by in its first run_all (Linux
/proc/self/statm; the bundle is loaded and its VM created before the first reading).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mtcompile
from mtcompile.models import SETS, get_set
from mtcompile.passes import DEFAULT_PIPELINE

RESULTS = Path(__file__).parent / "RESULTS.md"

_RSS = """
import os, sys
import mtcompile
from mtcompile.tools.verify import seeded_run_all_inputs
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
b = mtcompile.load(sys.argv[1])
inputs = seeded_run_all_inputs(b)
b.prepare()
before = rss()
b.run_all(inputs)
print(rss() - before)
"""


def rss_growth(directory: Path) -> int:
    """Bytes a fresh process's resident set grows by in its first run_all."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS, str(directory)], check=True, capture_output=True, text=True
    ).stdout
    return int(out.strip().splitlines()[-1])


def variants() -> dict[str, dict]:
    no_plan = [p for p in DEFAULT_PIPELINE if p != "plan-memory"]
    return {
        "arena": {},
        "tvm plan": {"passes": no_plan},
        "naive": {"pass_options": {"plan-memory": {"strategy": "naive"}}},
    }


def run(set_name: str, batch: int, repeat: int) -> dict:
    tenants = get_set(set_name, batch=batch)
    inputs = {t.name: t.example_inputs for t in tenants}
    bundles = {k: mtcompile.compile(tenants, **kw) for k, kw in variants().items()}
    mem = bundles["arena"].report()["memory"]
    rss = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, b in bundles.items():
            rss[k] = rss_growth(b.save(Path(tmp) / k.replace(" ", "_")))
    for b in bundles.values():  # warm up, then alternate round by round
        b.run_all(inputs)
    times: dict[str, list[float]] = {k: [] for k in bundles}
    for _ in range(repeat):
        for k, b in bundles.items():
            t0 = time.perf_counter()
            b.run_all(inputs)
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    planned = {
        "arena": mem["arena_bytes"],
        "tvm plan": mem["tvm_plan_bytes"],
        "naive": bundles["naive"].report()["memory"]["arena_bytes"],
    }
    return {
        "set": set_name,
        "batch": batch,
        "tenants": len(tenants),
        "memory": mem,
        "planned": planned,
        "rss": rss,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "time_ratio": {k: med[k] / med["arena"] for k in med},
    }


def kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def to_markdown(res: dict, command: str) -> str:
    m = res["memory"]
    lines = [
        f"### memory, {res['set']}: {res['tenants']} tenants, batch {res['batch']}",
        "",
        f"`{command}` ({datetime.date.today()})",
        "",
        "| run_all | KiB | / arena |",
        "|---|---:|---:|",
    ]
    rows = [
        ("arena (plan-memory)", m["arena_bytes"]),
        ("lower bound", m["lower_bound_bytes"]),
        ("TVM's plan, same module", m["tvm_plan_bytes"]),
        ("no planning (naive)", m["naive_bytes"]),
        ("tenants compiled separately (TVM's plans)", m["separate_plans_bytes"]),
        ("tenants compiled separately (our arenas)", m["separate_arena_bytes"]),
    ]
    lines += [f"| {k} | {kib(v)} | {v / m['arena_bytes']:.2f} |" for k, v in rows]
    lines += [
        "",
        f"Weights: {kib(m['weight_bytes_before_dedup'])} KiB for the tenants "
        f"separately, {kib(m['weight_bytes'])} KiB stored.",
        "",
        "| variant | planned KiB | RSS growth, first run_all, KiB | run_all ms (median) "
        "| time / arena |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in res["planned"]:
        lines.append(
            f"| {k} | {kib(res['planned'][k])} | {kib(res['rss'][k])} | "
            f"{res['median_ms'][k]:.3f} | {res['time_ratio'][k]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="all", choices=[*SETS, "all"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--write", action="store_true", help=f"append the tables to {RESULTS}")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    for s in SETS if args.set == "all" else [args.set]:
        text = to_markdown(run(s, args.batch, args.repeat), command)
        print(text, flush=True)
        if args.write:
            with RESULTS.open("a") as f:
                f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
