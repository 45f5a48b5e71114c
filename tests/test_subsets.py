"""Merged calls over subsets of tenants (issue 26 item 1): ``compile(subsets=...)`` emits a
function per subset, run by ``Bundle.run_some``; it matches the tenants' entries and PyTorch,
batches the present same-architecture tenants (never an absent one), survives save and
load, and the scheduler calls it when exactly those tenants have work."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import linear_relu, tiny_conv, torch_outputs

import mtcompile
from mtcompile import Tenant
from mtcompile.errors import InputError, TenantError
from mtcompile.pass_infra import Instrument
from mtcompile.passes import DEFAULT_PIPELINE
from mtcompile.serving import Scheduler

TOL = {"atol": 1e-5, "rtol": 1e-5}
SUBSETS = [("p", "q"), ("p", "q", "r")]


def _tenants() -> list[Tenant]:
    """p, q, r: LinearReLUs of different weights (one architecture); conv: a TinyConv."""
    out = [
        Tenant(n, m, example_inputs=x)
        for n, (m, x) in zip("pqr", (linear_relu(i) for i in range(3)), strict=True)
    ]
    m, x = tiny_conv(0)
    return [*out, Tenant("conv", m, example_inputs=x)]


class Seen(Instrument):
    """Each pass an instrument sees, with the functions of the module it sees."""

    def __init__(self):
        self.seen = []

    def after_pass(self, p, result, index, seconds):
        self.seen.append((p.name, tuple(result.graph.functions)))


@pytest.fixture(scope="module")
def watched():
    """The four tenants with two subset functions, compiled once (a few seconds), and what
    an instrument saw of the build."""
    seen = Seen()
    return mtcompile.compile(_tenants(), subsets=SUBSETS, name="subsets", instruments=[seen]), seen


@pytest.fixture(scope="module")
def sub_bundle(watched):
    return watched[0]


def _inputs(names) -> dict[str, tuple[np.ndarray, ...]]:
    return {
        t.name: tuple(x.numpy() for x in t.example_inputs) for t in _tenants() if t.name in names
    }


def _check(bundle, got: dict, names) -> None:
    """`got` (by tenant) equals each tenant's entry and PyTorch."""
    assert list(got) == list(names)
    sources = {t.name: t for t in _tenants()}
    for t in names:
        entry = bundle.run(t, *_inputs([t])[t])
        torch = torch_outputs(sources[t].model, sources[t].example_inputs)
        assert len(got[t]) == len(entry) == len(torch)
        for g, e, w in zip(got[t], entry, torch, strict=True):
            np.testing.assert_allclose(g, e, **TOL)
            np.testing.assert_allclose(g, w, **TOL)


def test_one_pipeline_run_per_build(watched):
    # every pass once, over the module: each tenant's entry, run_all and the subsets
    functions = ("p", "q", "r", "conv", "run_all", "run_some__p__q", "run_some__p__q__r")
    assert watched[1].seen == [(name, functions) for name in DEFAULT_PIPELINE]
    assert tuple(watched[0].module.functions) == functions


def test_the_manifest_records_each_subset_function(sub_bundle):
    subsets = sub_bundle.manifest.subsets
    assert {f: s.tenants for f, s in subsets.items()} == {
        "run_some__p__q": ("p", "q"),
        "run_some__p__q__r": ("p", "q", "r"),
    }
    assert subsets["run_some__p__q"].inputs == ((("p", "x"),), (("q", "x"),))
    assert sub_bundle.subsets == {
        ("p", "q"): "run_some__p__q",
        ("p", "q", "r"): "run_some__p__q__r",
    }
    # each function has its own memory plan
    assert set(sub_bundle.manifest.memory.functions) >= {"run_some__p__q", "run_some__p__q__r"}


@pytest.mark.parametrize(
    "names", [("p", "q"), ("p", "q", "r"), ("q", "conv"), ("p", "q", "r", "conv"), ("r",)]
)
def test_run_some_matches_the_entries_and_torch(sub_bundle, names):
    # a built subset, one without a function of its own (the entries), all (run_all), one
    _check(sub_bundle, sub_bundle.run_some(_inputs(names)), names)


def test_subset_functions_batch_the_present_tenants_only(sub_bundle):
    (fuse,) = [r for r in sub_bundle.compile_report["passes"] if r["name"] == "fuse-horizontal"]
    # one pass run over the module: each multi-tenant function batched its own tenants
    groups = {f: info["groups"] for f, info in fuse.items() if isinstance(info, dict)}
    assert groups == {
        "run_all": [["p", "q", "r"]],
        "run_some__p__q": [["p", "q"]],
        "run_some__p__q__r": [["p", "q", "r"]],
    }


def test_a_saved_bundle_keeps_its_subsets(sub_bundle, tmp_path):
    loaded = mtcompile.load(sub_bundle.save(tmp_path / "b"))
    assert loaded.manifest.subsets == sub_bundle.manifest.subsets
    got = loaded.run_some(_inputs(("p", "q")))
    want = sub_bundle.run_some(_inputs(("p", "q")))
    for t in ("p", "q"):
        np.testing.assert_array_equal(got[t][0], want[t][0])


def test_run_some_checks_its_inputs(sub_bundle):
    with pytest.raises(InputError, match=r"unknown tenant\(s\) \['z'\]"):
        sub_bundle.run_some({"p": _inputs("p")["p"], "z": ()})
    with pytest.raises(InputError, match="naming one tenant or more"):
        sub_bundle.run_some({})
    bad = {"p": (np.zeros((3, 8), np.float32),), "q": _inputs("q")["q"]}
    with pytest.raises(InputError, match="tenant 'p'"):
        sub_bundle.run_some(bad)


@pytest.mark.parametrize(
    "subsets, match",
    [
        ([("p", "z")], r"unknown or repeated tenant\(s\) \['z'\]"),
        ([("p", "p")], "unknown or repeated"),
        ([("p",)], "at least two tenants and not all of them"),
        ([("p", "q", "r", "conv")], "at least two tenants and not all of them"),
    ],
)
def test_bad_subsets_are_refused_before_any_work(subsets, match):
    with pytest.raises(TenantError, match=match):
        mtcompile.compile(_tenants(), subsets=subsets)


def test_the_scheduler_calls_the_subset_function(sub_bundle):
    inputs = _inputs(("p", "q", "conv"))
    s = Scheduler(sub_bundle, start=False)
    first = {t: s.submit(t, *inputs[t]) for t in ("p", "q")}
    s.start()
    got = {t: f.result(timeout=60) for t, f in first.items()}
    lone = s.submit("conv", *inputs["conv"]).result(timeout=60)
    s.close()
    _check(sub_bundle, got, ("p", "q"))
    _check(sub_bundle, {"conv": lone}, ("conv",))
    m = s.metrics()
    assert m["calls"] == {"run_some": 1, "run": 1}
    assert m["tenants"]["p"]["calls"] == {"run_some": 1}
