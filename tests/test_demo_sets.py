"""End-to-end checks of the user-scale demo sets "bert4" and "mixed": compile, verify, and
merged calls over subsets of their tenants (``run_some``) against the entries and PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

import mtcompile
from mtcompile.models import get_set
from mtcompile.tools.verify import reference_outputs, seeded_run_all_inputs


@pytest.mark.slow
@pytest.mark.parametrize("set_name", ["bert4", "mixed"])
def test_demo_set_compiles_and_matches_sources(set_name):
    tenants = get_set(set_name)
    names = [t.name for t in tenants]
    subsets = [tuple(names[:2]), tuple(names[1:])]  # 2 of 4 and 3 of 4
    bundle = mtcompile.compile(tenants, subsets=subsets)
    result = bundle.verify(atol=1e-4)
    bad = {name: r for name, r in result["tenants"].items() if not r["ok"]}
    assert result["ok"], f"{set_name}: tenants off by more than 1e-4: {bad}"
    assert bundle.tenant_names == names
    by_name, inputs = {t.name: t for t in tenants}, seeded_run_all_inputs(bundle)
    for subset in subsets:
        assert subset in bundle.subsets
        got = bundle.run_some({t: inputs[t] for t in subset})
        for t in subset:
            want = reference_outputs(by_name[t], inputs[t])
            entry = bundle.run(t, *inputs[t])
            for g, e, w in zip(got[t], entry, want, strict=True):
                np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
                np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
