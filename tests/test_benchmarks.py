"""Fast checks of the benchmark scripts' helpers (no timing, no TVM compile)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.neighbours import load_inputs, time_block, to_markdown
from benchmarks.run import set_options


def test_set_options_pass_n_only_to_sets_that_take_it():
    assert set_options("bert4", 3, 1) == {"batch": 1, "n": 3}
    assert set_options("same-arch", 2, 2) == {"batch": 2, "n": 2}
    assert set_options("mixed", 3, 1) == {"batch": 1}
    assert set_options("heterogeneous", 3, 1) == {"batch": 1}


def test_load_inputs_keeps_tenant_input_order(tmp_path):
    arrays = {"a/0": np.zeros(2), "a/1": np.ones(3), "b/0": np.arange(4)}
    np.savez(tmp_path / "inputs.npz", **arrays)
    got = load_inputs(tmp_path / "inputs.npz", ["b", "a"])
    assert list(got) == ["b", "a"]
    assert [x.shape for x in got["a"]] == [(2,), (3,)]
    np.testing.assert_array_equal(got["b"][0], np.arange(4))


def test_time_block_counts_warmup_apart():
    calls = []
    times = time_block(lambda: calls.append(1), repeat=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_neighbours_table_reports_ratios_and_skipped_compile():
    rows = {
        "bundle": {
            "alone_ms": 2.0,
            "interleaved_ms": 3.0,
            "interleaved_ratio": 1.5,
            "beside_bundle_ms": None,
            "beside_bundle_ratio": None,
            "after_compile_ms": None,
            "after_compile_ratio": None,
        },
        "onnxruntime": {
            "alone_ms": 2.0,
            "interleaved_ms": 3.0,
            "interleaved_ratio": 1.5,
            "beside_bundle_ms": 2.1,
            "beside_bundle_ratio": 1.05,
            "after_compile_ms": None,
            "after_compile_ratio": None,
        },
    }
    res = {
        "set": "bert4",
        "tenants": ["bert0"],
        "repeat": 3,
        "rows": rows,
        "torch_compile_ms": None,
        "torch_compile_skipped": "RuntimeError: no compiler",
        "torch_imported_by_load": True,
        "max_abs_err": 1e-6,
    }
    text = to_markdown(res, "python -m benchmarks.neighbours --repeat 3")
    assert "| bundle | 2.000 | 3.000 | 1.50 |" in text
    assert "| onnxruntime | 2.000 | 3.000 | 1.50 | 2.100 | 1.05 |" in text
    assert "torch.compile row skipped: RuntimeError: no compiler" in text
    assert "`python -m benchmarks.neighbours --repeat 3`" in text


def test_call_cost_chain_makes_the_calls_it_says():
    """benchmarks.calls times a function of N chained calls: the module holds exactly N."""
    from benchmarks.calls import chain

    text = chain("mtcompile.native.matmul", 7).script()
    assert text.count('call_dps_packed("mtcompile.native.matmul"') == 7


def test_coverage_table_counts_matches_and_geomeans():
    from benchmarks.coverage import to_markdown as coverage_md
    from benchmarks.coverage import totals

    rows = [
        {
            "model": "a",
            "family": "encoder",
            "match": True,
            "rel_err": 1e-7,
            "compile_s": 2.0,
            "ms": {"bundle": 1.0, "eager": 2.0, "onnxruntime": 0.5},
            "tvm_share": 0.25,
        },
        {
            "model": "b",
            "family": "vision",
            "match": True,
            "rel_err": 2e-7,
            "compile_s": 1.0,
            "ms": {"bundle": 2.0, "eager": 1.0, "onnxruntime": 8.0},
            "tvm_share": 0.5,
        },
        {"model": "c", "family": "audio", "error": "TenantError: no"},
    ]
    t = totals(rows)
    assert (t["matching"], t["total"]) == (2, 3)
    assert t["eager_geomean"] == pytest.approx(1.0) and t["ort_geomean"] == pytest.approx(2**0.5)
    assert t["slower_than_eager"] == ["b"]
    text = coverage_md(rows, "python -m benchmarks.coverage")
    assert "**Compiled and matching: 2 / 3**" in text and "TenantError: no" in text


def test_contention_table_reports_slowdowns():
    from benchmarks.contention import to_markdown as contention_md

    res = {
        "set": "mixed",
        "repeat": 3,
        "threads": {"default": 2, "taskset -c 0": 1},
        "ms": {
            "0 busy": {"bundle": 2.0, "onnxruntime": 4.0},
            "2 busy": {"bundle": 3.0, "onnxruntime": 10.0},
            "after OpenVINO": {"bundle": 5.0, "onnxruntime": 4.4},
        },
    }
    text = contention_md(res, "python -m benchmarks.contention")
    assert "| 2 busy | 3.000 | 1.50 | 10.000 | 2.50 |" in text
    assert "| after OpenVINO | 5.000 | 2.50 | 4.400 | 1.10 |" in text
    res["ms"].pop("after OpenVINO")
    res["notes"] = {"after OpenVINO": "openvino not installed (text, vit)"}
    text = contention_md(res, "python -m benchmarks.contention")
    assert "| after OpenVINO | not run: openvino not installed (text, vit) |" in text
    assert "under `taskset -c 0`: 1" in text
