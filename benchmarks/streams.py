"""run_all on streams vs one stream, side by side in ONE process.

    python -m benchmarks.streams [--set all|bert4|mixed|...] [--repeat 200] [--json FILE]

Per tenant set, three bundles: the default pipeline (``assign-streams`` with ``auto``:
what a user gets), forced one stream, and forced ``max`` streams (the raw multi-stream
executor). Rounds alternate the contenders, so machine noise hits all alike; medians and
the ratios ``auto / one`` (the requirement: at most 1.10) and ``max / one`` are reported,
with the numerics of ``max`` checked against one stream bit for bit first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import mtcompile
from mtcompile.models import SETS, get_set
from mtcompile.passes import DEFAULT_PIPELINE
from mtcompile.tools.verify import seeded_run_all_inputs

from .coverage import round_times as measure

PIPELINE = [p for p in DEFAULT_PIPELINE if p not in ("assign-streams", "plan-memory")] + [
    "assign-streams",
    "plan-memory",
]


def run(set_name: str, repeat: int, warmup: int) -> dict:
    tenants = get_set(set_name)
    bundles = {
        "auto": mtcompile.compile(tenants, passes=PIPELINE),
        "one": mtcompile.compile(
            tenants, passes=PIPELINE, pass_options={"assign-streams": {"streams": 1}}
        ),
        "max": mtcompile.compile(
            tenants, passes=PIPELINE, pass_options={"assign-streams": {"policy": "max"}}
        ),
    }
    inputs = seeded_run_all_inputs(bundles["one"])
    ref = bundles["one"].run_all(inputs)
    got = bundles["max"].run_all(inputs)
    exact = all(np.array_equal(a, b) for t in ref for a, b in zip(ref[t], got[t], strict=True))
    times = measure(
        {k: (lambda b=b: b.run_all(inputs)) for k, b in bundles.items()}, repeat, warmup
    )
    med = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
    return {
        "set": set_name,
        "median_us": med,
        "streams": {k: b.num_streams for k, b in bundles.items()},
        "syncs": bundles["max"].report()["streams"]["num_syncs"],
        "estimated_speedup_max": bundles["max"].report()["streams"]["estimated_speedup"],
        "auto_over_one": med["auto"] / med["one"],
        "max_over_one": med["max"] / med["one"],
        "max_bit_exact": exact,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--set", default="all", choices=[*SETS, "all"], help="a demo set, or all of them"
    )
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = ap.parse_args(argv)
    sets = list(SETS) if args.set == "all" else [args.set]
    results = []
    print(
        "| set | streams (auto/max) | syncs | one us | auto us | max us | auto/one | "
        "max/one | max bit-exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s in sets:
        r = run(s, args.repeat, args.warmup)
        results.append(r)
        m = r["median_us"]
        print(
            f"| {s} | {r['streams']['auto']}/{r['streams']['max']} | {r['syncs']} | "
            f"{m['one']:.0f} | {m['auto']:.0f} | {m['max']:.0f} | {r['auto_over_one']:.3f} | "
            f"{r['max_over_one']:.3f} | {r['max_bit_exact']} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["auto_over_one"] <= 1.10 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
