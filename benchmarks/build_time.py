"""Build time of real-model zoo tenants (`mtcompile.compile`), two checkouts side by side.

    git worktree add /tmp/old REV
    python -m benchmarks.build_time --old /tmp/old [--new .] [--runs 2]
                                    [--tenants gemma llama bert electra+gemma+gpt2]

Each run starts one process per checkout (old, then new): it compiles a warm-up tenant (imports,
native kernels), then each entry of `--tenants` ('+' joins the tenants of one bundle), timing
`compile` alone and checking each bundle with `verify`. Seconds per run, and new / old of the
medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
root = sys.argv[1]
sys.path.insert(0, root)
import mtcompile
assert os.path.realpath(mtcompile.__file__).startswith(os.path.realpath(root)), mtcompile.__file__
from mtcompile.models.hf import real_zoo_tenants
mtcompile.compile(real_zoo_tenants(["bert"]))
out = {}
for names in sys.argv[2:]:
    tenants = real_zoo_tenants(names.split("+"))
    t0 = time.perf_counter()
    bundle = mtcompile.compile(tenants)
    out[names] = time.perf_counter() - t0
    assert bundle.verify()["ok"], names
print(json.dumps(out))
"""

TENANTS = [
    "gemma",
    "llama",
    "bert",
    "t5_encoder",
    "mobilevit",
    "electra+gemma+gpt2+gpt_neox+hubert",
]


def times(root: Path, tenants: list[str]) -> dict[str, float]:
    """Seconds per entry of `tenants`, compiled by the checkout at `root` in a process of its own."""
    import json

    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), *tenants],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if res.returncode != 0:
        raise SystemExit(f"{root}: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.build_time", description=__doc__)
    ap.add_argument("--old", required=True, type=Path, help="the other checkout")
    ap.add_argument("--new", default=Path("."), type=Path)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tenants", nargs="+", default=TENANTS)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for _ in range(args.runs):
        for side in ("old", "new"):
            runs[side].append(times(getattr(args, side).resolve(), args.tenants))
    print("| tenants | old s | new s | new / old |\n|---|---|---|---|")
    for t in args.tenants:
        old, new = ([r[t] for r in runs[s]] for s in ("old", "new"))
        ratio = statistics.median(new) / statistics.median(old)
        print(
            f"| {t} | {', '.join(f'{x:.2f}' for x in old)} | "
            f"{', '.join(f'{x:.2f}' for x in new)} | {ratio:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
