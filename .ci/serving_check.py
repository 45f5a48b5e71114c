"""CI's serving-host check: a bundle saved by the full install runs in a base install (no torch)
with the full install's outputs, importing neither tvm (the compiler) nor torch.

    python .ci/serving_check.py save BUNDLE REF.npz    # in the full install: inputs + outputs
    python .ci/serving_check.py check BUNDLE REF.npz   # in the serving install: compare
"""

from __future__ import annotations

import sys

import numpy as np

import mtcompile
from mtcompile.runtime.inputs import seeded_inputs


def save(bundle_dir: str, ref: str) -> None:
    import torch  # noqa: F401  (the full install: torch and the compiler loaded too)
    import tvm  # noqa: F401

    b = mtcompile.load(bundle_dir)
    inputs = {t: seeded_inputs(b.signature(t), i) for i, t in enumerate(b.tenant_names)}
    out = b.run_all(inputs)
    np.savez(ref, **{f"in.{t}.{i}": a for t, xs in inputs.items() for i, a in enumerate(xs)},
             **{f"out.{t}.{i}": a for t, xs in out.items() for i, a in enumerate(xs)})


def check(bundle_dir: str, ref: str) -> None:
    z = np.load(ref)
    b = mtcompile.load(bundle_dir)
    inputs = {t: [z[f"in.{t}.{i}"] for i in range(len(b.signature(t).inputs))]
              for t in b.tenant_names}
    got = b.run_all(inputs)
    for t in b.tenant_names:
        alone = b.run(t, *inputs[t])
        for i, (a, r) in enumerate(zip(got[t], alone, strict=True)):
            np.testing.assert_array_equal(a, z[f"out.{t}.{i}"], err_msg=f"run_all: {t} {i}")
            np.testing.assert_array_equal(r, z[f"out.{t}.{i}"], err_msg=f"run: {t} {i}")
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tvm", "torch"))
    if heavy:
        raise SystemExit(f"the serving install imported {heavy[:5]}")
    fp = b.footprint()
    print(f"serving install: {b.manifest.name} ({len(b.tenant_names)} tenants) ran with the "
          f"full install's outputs; resident runtime {fp['runtime'] >> 20} MiB, code "
          f"{fp['code'] >> 10} KiB, weights {fp['weights'] >> 10} KiB, arena "
          f"{(fp['arena'] or 0) >> 10} KiB")


if __name__ == "__main__":
    {"save": save, "check": check}[sys.argv[1]](sys.argv[2], sys.argv[3])
