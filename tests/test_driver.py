"""The C++ driver mtcompile-run (mtcompile.driver): a saved bundle loaded and run by TVM's
runtime alone gives exactly what the Python runtime gives, on every demo set; bad inputs and
bundles it cannot run are refused with a message and exit status 3."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import mtcompile
from mtcompile.driver import command

pytestmark = pytest.mark.slow  # compiles the driver (once, cached) and bundles


def _inputs(bundle) -> dict[str, list[np.ndarray]]:
    """Seeded inputs for every tenant, within each index input's range; tenants that share
    an input are given one array."""
    rng = np.random.default_rng(0)
    out, shared = {}, {}
    for name in bundle.tenant_names:
        arrays = []
        for io in bundle.manifest.tenants[name].inputs:
            if io.shared_as in shared:
                arrays.append(shared[io.shared_as])
                continue
            if io.index_range is not None:
                arrays.append(rng.integers(*io.index_range, size=io.shape).astype(io.dtype))
            else:
                arrays.append(rng.standard_normal(io.shape).astype(io.dtype))
            if io.shared_as is not None:
                shared[io.shared_as] = arrays[-1]
        out[name] = arrays
    return out


def _write(bundle, inputs, d) -> None:
    d.mkdir(exist_ok=True)
    for name, arrays in inputs.items():
        for io, a in zip(bundle.manifest.tenants[name].inputs, arrays, strict=True):
            np.save(d / f"{name}.{io.name}.npy", a)


def _drive(saved, entry, in_dir, out_dir, threads=2, timing=False) -> subprocess.CompletedProcess:
    out_dir.mkdir(exist_ok=True)
    return subprocess.run(
        command(saved, entry, in_dir, out_dir, threads, timing),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _outputs(bundle, name, out_dir) -> list[np.ndarray]:
    return [
        np.load(out_dir / f"{name}.{io.name}.npy") for io in bundle.manifest.tenants[name].outputs
    ]


@pytest.mark.parametrize("set_name", ["heterogeneous", "same-arch", "shared-backbone"])
def test_driver_equals_python_on_demo_set(set_name, tmp_path):
    from mtcompile.models import get_set

    bundle = mtcompile.compile(get_set(set_name), threads=2)
    saved = bundle.save(tmp_path / "bundle")
    loaded = mtcompile.load(saved, threads=2)
    inputs = _inputs(loaded)
    _write(loaded, inputs, tmp_path / "in")
    res = _drive(saved, "run_all", tmp_path / "in", tmp_path / "all", timing=True)
    assert res.returncode == 0, res.stderr
    timing = json.loads(res.stdout)
    assert timing["load_s"] > 0 and timing["first_call_s"] > 0 and timing["peak_rss_kib"] > 0
    want = loaded.run_all(inputs)
    for name in loaded.tenant_names:
        for got, ref in zip(_outputs(loaded, name, tmp_path / "all"), want[name], strict=True):
            assert got.dtype == ref.dtype and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref, err_msg=f"{set_name}: run_all, {name}")
        res = _drive(saved, name, tmp_path / "in", tmp_path / name)
        assert res.returncode == 0, res.stderr
        for got, ref in zip(
            _outputs(loaded, name, tmp_path / name), loaded.run(name, *inputs[name]), strict=True
        ):
            np.testing.assert_array_equal(got, ref, err_msg=f"{set_name}: run {name}")


@pytest.fixture(scope="module")
def hetero_saved(hetero_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("driver")
    saved = hetero_bundle.save(d / "bundle")
    inputs = _inputs(hetero_bundle)
    _write(hetero_bundle, inputs, d / "in")
    return saved, d, inputs


def _refused(res, *words) -> None:
    assert res.returncode == 3, (res.returncode, res.stderr)
    for w in words:
        assert w in res.stderr, res.stderr


def _bad_dir(hetero_bundle, inputs, d, tenant, index, array):
    bad = {k: list(v) for k, v in inputs.items()}
    bad[tenant][index] = array
    _write(hetero_bundle, bad, d)
    return d


def test_bad_shape_dtype_missing_file_and_bad_entry(hetero_bundle, hetero_saved):
    saved, d, inputs = hetero_saved
    x = inputs["vision"][0]
    bad = _bad_dir(hetero_bundle, inputs, d / "shape", "vision", 0, x[:, :, :-1])
    _refused(
        _drive(saved, "vision", bad, d / "o1"),
        "tenant 'vision', input 'x'",
        f"expected float32{list(x.shape)}",
        f"got float32{list(x[:, :, :-1].shape)}",
    )
    bad = _bad_dir(hetero_bundle, inputs, d / "dtype", "vision", 0, x.astype(np.float64))
    _refused(_drive(saved, "run_all", bad, d / "o2"), "expected float32", "got float64")
    _refused(_drive(saved, "vision", d / "nowhere", d / "o3"), "cannot open the input directory")
    _refused(_drive(saved, "nope", d / "in", d / "o4"), "no tenant 'nope'", "vision")


def test_index_out_of_range_is_refused_before_the_call(hetero_bundle, hetero_saved):
    saved, d, inputs = hetero_saved
    name, i, io = next(
        (t, i, io)
        for t in hetero_bundle.tenant_names
        for i, io in enumerate(hetero_bundle.manifest.tenants[t].inputs)
        if io.index_range is not None
    )
    ids = inputs[name][i].copy()
    ids.flat[3] = io.index_range[1]  # one past the table
    bad = _bad_dir(hetero_bundle, inputs, d / "range", name, i, ids)
    _refused(
        _drive(saved, name, bad, d / "o5"),
        f"tenant '{name}', input '{io.name}'",
        f"must be in [{io.index_range[0]}, {io.index_range[1]}); got values in",
        f", {io.index_range[1]}]",
    )


def test_streamed_run_all_runs_on_the_core_executor_as_python_does(tmp_path):
    """run_all of a streamed bundle runs on the runtime core's stream executor in both
    front-ends: the driver's outputs are the Python runtime's, bit for bit; a stream failing an
    index check fails the call with Python's line (exit 3)."""
    from test_reliability_compile import streamed_gathers

    from mtcompile.errors import IndexOutOfRangeError

    bundle, inputs, bad, want = streamed_gathers()
    saved = bundle.save(tmp_path / "b")
    loaded = mtcompile.load(saved)
    assert loaded.manifest.streams.run is not None
    as_numpy = {t: [np.asarray(a) for a in v] for t, v in inputs.items()}
    _write(bundle, as_numpy, tmp_path / "in")
    res = _drive(saved, "run_all", tmp_path / "in", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    python = loaded.run_all(inputs)
    for name in bundle.tenant_names:
        got = _outputs(bundle, name, tmp_path / "o")
        for g, p, w in zip(got, python[name], want[name], strict=True):
            np.testing.assert_array_equal(g, p)
            np.testing.assert_array_equal(g, w)
            assert g.dtype == p.dtype
    _write(bundle, {t: [np.asarray(a) for a in v] for t, v in bad.items()}, tmp_path / "bad")
    with pytest.raises(IndexOutOfRangeError) as e:
        loaded.run_all(bad)
    _refused(_drive(saved, "run_all", tmp_path / "bad", tmp_path / "o2"), str(e.value))
