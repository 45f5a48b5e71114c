"""A merged call over a subset of tenants (``Bundle.run_some``) against the per-tenant entries
it replaces (each present tenant's ``run``, one after another), and run_all for scale.

    python -m benchmarks.subsets [--set mixed] [--repeat 20] [--warmup 3]

One compile of the set with two subset functions: its first two tenants (2 of 4) and its
last three (3 of 4). Contenders alternate round by round in one process (`measure`);
the median per call is printed in ms. Outputs are checked against the entries first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import mtcompile
from mtcompile.models import get_set
from mtcompile.tools.verify import seeded_run_all_inputs

from .coverage import round_times as measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="mixed")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    tenants = get_set(args.set)
    names = [t.name for t in tenants]
    subsets = [tuple(names[:2]), tuple(names[1:])]
    t0 = time.perf_counter()
    bundle = mtcompile.compile(tenants, subsets=subsets)
    print(f"compiled {args.set} with subsets {subsets} in {time.perf_counter() - t0:.1f} s")
    inputs = seeded_run_all_inputs(bundle)
    for subset in subsets:
        given = {t: inputs[t] for t in subset}
        got = bundle.run_some(given)
        for t in subset:
            for g, e in zip(got[t], bundle.run(t, *inputs[t]), strict=True):
                np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
        contenders = {
            "run_some": lambda given=given: bundle.run_some(given),
            "entries": lambda subset=subset: [bundle.run(t, *inputs[t]) for t in subset],
        }
        times = measure(contenders, args.repeat, args.warmup)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(
            f"{len(subset)} of {len(names)} {list(subset)}: run_some {ms['run_some']:.2f} ms, "
            f"entries {ms['entries']:.2f} ms, entries / run_some "
            f"{ms['entries'] / ms['run_some']:.2f}"
        )
    times = measure({"run_all": lambda: bundle.run_all(inputs)}, args.repeat, args.warmup)
    print(f"run_all (4 of 4): {1e3 * statistics.median(times['run_all']):.2f} ms")


if __name__ == "__main__":
    main()
