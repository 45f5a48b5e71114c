"""End-to-end checks of the user-scale demo sets "bert4" and "mixed": compile, verify."""

from __future__ import annotations

import pytest

import mtcompile
from mtcompile.models import get_set


@pytest.mark.slow
@pytest.mark.parametrize("set_name", ["bert4", "mixed"])
def test_demo_set_compiles_and_matches_sources(set_name):
    tenants = get_set(set_name)
    bundle = mtcompile.compile(tenants)
    result = bundle.verify(atol=1e-4)
    bad = {name: r for name, r in result["tenants"].items() if not r["ok"]}
    assert result["ok"], f"{set_name}: tenants off by more than 1e-4: {bad}"
    assert bundle.tenant_names == [t.name for t in tenants]
