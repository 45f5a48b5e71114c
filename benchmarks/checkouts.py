"""Two checkouts of mtcompile against each other: a set's bundle built by each, then timed in
processes of their own (the native kernels of two checkouts cannot share one process: one
thread pool per process), old and new alternating, quiet and with busy processes beside.

    git worktree add /tmp/old REV
    python -m benchmarks.checkouts --old /tmp/old [--new .] [--set mixed] [--runs 3]
                                   [--calls 200] [--busy 0 1 2] [--write]

Each process loads its bundle, warms up, and times `run_all` (`--calls` calls, at most 20 s);
the figure per condition is the median over `--runs` processes of each process's median.
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

from benchmarks.contention import busy, stop
from benchmarks.coverage import RESULTS, publish
from mtcompile.models import SETS

# runs in a child process with the checkout first on sys.path: build, or load and time
CHILD = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
root, cmd, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, root)
import numpy as np
import mtcompile
assert os.path.realpath(mtcompile.__file__).startswith(os.path.realpath(root)), mtcompile.__file__
import importlib.util
for sub in ("passes", "models"):  # a checkout from before the mtcompile/passes, /models links
    d = os.path.join(root, sub)
    if os.path.isdir(d) and not os.path.exists(os.path.join(root, "mtcompile", sub)):
        spec = importlib.util.spec_from_file_location(
            f"mtcompile.{sub}", os.path.join(d, "__init__.py"), submodule_search_locations=[d])
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
if cmd == "build":
    from mtcompile.models import get_set
    tenants = get_set(sys.argv[4], batch=1)
    mtcompile.compile(tenants).save(out)
    np.savez(os.path.join(out, "inputs.npz"), **{f"{t.name}:{i}": np.asarray(x)
             for t in tenants for i, x in enumerate(t.example_inputs)})
else:
    b = mtcompile.load(out)
    z = np.load(os.path.join(out, "inputs.npz"))
    inputs = {}
    for k in sorted(z.files, key=lambda k: (k.split(":")[0], int(k.split(":")[1]))):
        inputs.setdefault(k.split(":")[0], []).append(z[k])
    for _ in range(20):
        b.run_all(inputs)
    times, end = [], time.time() + 20
    for _ in range(int(sys.argv[4])):
        t = time.perf_counter()
        b.run_all(inputs)
        times.append(time.perf_counter() - t)
        if time.time() > end:
            break
    print(json.dumps(1e3 * float(np.median(times))))
"""


def child(root: str, *args: str) -> str:
    """Run CHILD with `root`'s checkout; its last line of output."""
    r = subprocess.run(
        [sys.executable, "-c", CHILD, root, *args], capture_output=True, text=True, timeout=900
    )
    if r.returncode != 0:
        raise RuntimeError(f"checkout {root}: {' '.join(args[:1])} failed:\n{r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""


def run(
    roots: dict[str, str], set_name: str, runs: int, calls: int, conditions: list[int], work: Path
) -> dict:
    """{condition: {"old": ms, "new": ms}}: medians over `runs` processes each."""
    for label, root in roots.items():
        child(root, "build", str(work / label), set_name)
    table = {}
    for n in conditions:
        procs = busy(n)
        try:
            got = {label: [] for label in roots}
            for _ in range(runs):
                for label, root in roots.items():
                    got[label].append(json.loads(child(root, "run", str(work / label), str(calls))))
        finally:
            stop(procs)
        table[n] = {label: sorted(v)[len(v) // 2] for label, v in got.items()}
        print(f"{n} busy: " + ", ".join(f"{k} {v:.3f} ms" for k, v in table[n].items()), flush=True)
    return table


def to_markdown(set_name: str, roots: dict[str, str], table: dict, command: str) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Two checkouts: {set_name}",
        "",
        f"`{command}` — {when}, {os.cpu_count()} cores. Old: {roots['old']}, new: "
        f"{roots['new']}; `run_all` in processes of their own, median over processes.",
        "",
        "| busy processes | old ms | new ms | new / old |",
        "|---|---|---|---|",
    ]
    for n, r in table.items():
        lines.append(f"| {n} | {r['old']:.3f} | {r['new']:.3f} | {r['new'] / r['old']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the other checkout (a git worktree)")
    ap.add_argument("--new", default=".", help="this checkout (default: the current directory)")
    ap.add_argument("--set", default="mixed", choices=list(SETS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = ap.parse_args(argv)
    roots = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    command = "python -m benchmarks.checkouts " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="mtcompile-checkouts-") as tmp:
        table = run(roots, args.set, args.runs, args.calls, args.busy, Path(tmp))
    publish(to_markdown(args.set, roots, table, command), table, args.write, args.json)
    print(f"({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
