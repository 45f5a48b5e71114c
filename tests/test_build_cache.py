"""The build cache (keys, corrupt and racing entries, hits) and reproducible artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import mtcompile
from mtcompile import build_cache
from mtcompile.backend.tuning import RECORDS, WORKLOADS
from mtcompile.frontend.importers import import_tenant
from mtcompile.frontend.lift import lift
from mtcompile.models import mlp_fx
from mtcompile.passes import build_pipeline


def mlp(name: str = "m", seed: int = 0, batch: int = 2) -> mtcompile.Tenant:
    gm, shapes = mlp_fx(seed=seed, batch=batch, d_in=16, hidden=32, d_out=8)
    return mtcompile.Tenant(name, gm, input_shapes=shapes)


def key_of(tenants=None, **changes) -> str:
    """The cache key of a build, with one input changed by `changes`."""
    tenants = tenants or [mlp()]
    imported = [import_tenant(t) for t in tenants]
    graphs = [
        lift(it.mod["main"], t.name, it.input_names)
        for t, it in zip(tenants, imported, strict=True)
    ]
    args = dict(
        name="b",
        target="llvm",
        cpu="znver3",
        cpu_features=["+avx2"],
        providers={"matmul": "native", "conv2d": "native"},
        pipeline=build_pipeline(None, None),
        cores=2,
        tuning_db=None,
    )
    args.update(changes)
    return build_cache.build_key(
        build_cache.key_doc(**args, tenants=tenants, imported=imported, graphs=graphs)
    )


def test_the_key_changes_with_every_input_of_the_build_and_only_then():
    base = key_of()
    assert key_of() == base  # deterministic: same inputs, same key
    changed = {
        "tenant weights": key_of([mlp(seed=1)]),
        "tenant shapes": key_of([mlp(batch=3)]),
        "tenant name": key_of([mlp("other")]),
        "shared inputs": key_of([replace(mlp(), shared_inputs={"x": "frame"})]),
        "pipeline": key_of(pipeline=build_pipeline(["eliminate-dead-nodes"], None)),
        "pass option": key_of(
            pipeline=build_pipeline(None, {"plan-memory": {"strategy": "naive"}})
        ),
        "target": key_of(target="cuda"),
        "cpu": key_of(cpu="generic", cpu_features=[]),
        "providers": key_of(providers={"matmul": "tvm", "conv2d": "tvm"}),
        "threads": key_of(cores=3),
        "tuning db": key_of(tuning_db="sha256:00"),
        "bundle name": key_of(name="c"),
    }
    assert base not in changed.values()
    assert len(set(changed.values())) == len(changed), changed


def test_the_key_covers_the_tool_versions_and_native_kernels(monkeypatch):
    base = key_of()
    monkeypatch.setattr(build_cache.native, "source_hash", lambda: "edited")
    assert key_of() != base
    monkeypatch.undo()
    monkeypatch.setattr(
        build_cache.bundle_manifest,
        "versions",
        lambda: {"mtcompile": "9", "tvm": "0.27.0", "torch": "2", "onnx": "1"},
    )
    assert key_of() != base


def test_tuning_db_hash_is_its_content_not_its_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / WORKLOADS).write_text('{"w": 1}\n')
        (d / RECORDS).write_text('{"r": 1}\n')
    assert build_cache.tuning_db_hash(a) == build_cache.tuning_db_hash(b)
    assert build_cache.tuning_db_hash(a).startswith("sha256:") and str(
        a
    ) not in build_cache.tuning_db_hash(a)
    (b / RECORDS).write_text('{"r": 2}\n')
    assert build_cache.tuning_db_hash(a) != build_cache.tuning_db_hash(b)


def test_default_directory_follows_mtcompile_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MTCOMPILE_CACHE_DIR", str(tmp_path))
    assert build_cache.default_dir() == tmp_path / "builds"
    assert build_cache.resolve_dir(True) == tmp_path / "builds"
    assert build_cache.resolve_dir(False) is None and build_cache.resolve_dir(None) is None
    assert build_cache.resolve_dir(tmp_path / "x") == tmp_path / "x"


@pytest.mark.parametrize("damage", ["key", "manifest", "unreadable"])
def test_a_corrupt_entry_is_removed_never_loaded(tmp_path, damage, caplog):
    key = "ab" * 32
    entry = tmp_path / key
    entry.mkdir()
    (entry / "manifest.json").write_text("{}")
    record = {"key": key, "manifest_sha256": hashlib.sha256(b"{}").hexdigest()}
    if damage == "key":
        record["key"] = "cd" * 32
    elif damage == "manifest":
        record["manifest_sha256"] = "0" * 64
    (entry / "key.json").write_text("not json" if damage == "unreadable" else json.dumps(record))
    assert build_cache.lookup(tmp_path, key, sources={}, threads=None) is None
    assert not entry.exists() and list(tmp_path.iterdir()) == []
    assert "is corrupt" in caplog.text and "rebuilding" in caplog.text


def test_a_missing_entry_is_a_miss(tmp_path):
    assert build_cache.lookup(tmp_path, "ef" * 32, sources={}, threads=None) is None


@pytest.mark.slow
def test_second_build_is_served_from_the_cache_and_a_changed_tenant_rebuilds(tmp_path):
    cache = tmp_path / "cache"
    first = mtcompile.compile([mlp()], name="c", cache=cache)
    assert first.compile_report["cache"]["hit"] is False and first.graph is not None
    key = first.compile_report["cache"]["key"]
    assert sorted(p.name for p in (cache / key).iterdir()) == ["c.so", "key.json", "manifest.json"]
    again = mtcompile.compile([mlp()], name="c", cache=cache)
    assert again.compile_report["cache"] == {"hit": True, "key": key}
    assert "build" not in again.compile_report["stages_s"]  # nothing compiled
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_array_equal(again.run("m", x)[0], first.run("m", x)[0])
    assert again.verify()["ok"]  # the sources come along for verify
    a, b = first.save(tmp_path / "a"), again.save(tmp_path / "b")
    for f in ("c.so", "manifest.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    changed = mtcompile.compile([mlp(seed=5)], name="c", cache=cache)
    assert changed.compile_report["cache"]["hit"] is False
    assert changed.compile_report["cache"]["key"] != key
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2
    # a damaged library is rebuilt, not loaded, and the entry healed
    lib = cache / key / "c.so"
    lib.write_bytes(lib.read_bytes()[:-16] + b"\0" * 16)
    healed = mtcompile.compile([mlp()], name="c", cache=cache)
    assert healed.compile_report["cache"]["hit"] is False
    assert lib.read_bytes() == (a / "c.so").read_bytes()
    assert mtcompile.compile([mlp()], name="c", cache=cache).compile_report["cache"]["hit"]


@pytest.mark.slow
def test_two_builds_storing_one_entry_leave_one_whole_entry(tmp_path):
    cache = tmp_path / "cache"
    bundle = mtcompile.compile([mlp()], name="r")
    doc = {"test": 1}
    build_cache.store(cache, "k" * 64, doc, bundle)
    first = (cache / ("k" * 64) / "r.so").stat().st_mtime_ns
    other = mtcompile.compile([mlp()], name="r")
    build_cache.store(cache, "k" * 64, doc, other)  # the entry exists: theirs is kept
    assert (cache / ("k" * 64) / "r.so").stat().st_mtime_ns == first
    assert [p.name for p in cache.iterdir()] == ["k" * 64]  # no temporary left behind
    # both bundles save by copying the one entry (their bytes are the same)
    assert bundle._library_path == other._library_path == cache / ("k" * 64) / "r.so"
    assert (
        other.save(tmp_path / "o").joinpath("r.so").read_bytes()
        == (cache / ("k" * 64) / "r.so").read_bytes()
    )


@pytest.mark.slow
def test_two_uncached_builds_give_identical_bytes_without_paths(tmp_path):
    """Reproducible artifacts: the example spec (torch.export, ONNX and fx tenants, default
    pipeline) built by two processes with other hash seeds and working directories."""
    spec = Path(__file__).parents[1] / "models" / "heterogeneous.toml"
    outs = []
    for i in range(2):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "mtcompile",
                "build",
                str(spec),
                "-o",
                str(tmp_path / f"out{i}"),
                "--no-cache",
                "--no-verify",
                "-q",
            ],
            cwd=cwd,
            env={**os.environ, "PYTHONHASHSEED": str(i + 1)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(
            {
                f: (tmp_path / f"out{i}" / f).read_bytes()
                for f in ("heterogeneous.so", "manifest.json")
            }
        )
    assert outs[0] == outs[1]
    lib, manifest = outs[0]["heterogeneous.so"], outs[0]["manifest.json"]
    for path in (str(tmp_path), "/tmp/", str(spec.parent)):
        assert path.encode() not in lib and path.encode() not in manifest, path
    assert json.loads(manifest)["library_sha256"] == hashlib.sha256(lib).hexdigest()


def test_cached_entry_names_are_hashes_only(tmp_path):
    # a key is a sha256 of JSON: no path from the machine goes into an entry name
    assert len(key_of()) == 64 and all(c in "0123456789abcdef" for c in key_of())
    assert str(Path.home()) not in json.dumps(
        build_cache.key_doc(
            name="b",
            target="llvm",
            cpu=None,
            cpu_features=None,
            providers={},
            pipeline=[],
            cores=1,
            tuning_db=None,
            tenants=[],
            imported=[],
            graphs=[],
        )
    )
