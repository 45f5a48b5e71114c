"""Reliability of artifacts, the runtime and dtypes (issue 13): save never loses both bundles,
signatures, truncated libraries, file modes, repeated loads, fp16/bf16 models, bad tensors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import linear_relu

import mtcompile
from mtcompile.errors import ArtifactError, MTCompileError
from mtcompile.runtime import artifact
from mtcompile.runtime.abi import MANIFEST


@pytest.fixture
def two(lin_pair):
    """Two bundles of one tenant 'lin' whose outputs differ: (old, new, x), compiled once per
    session (conftest)."""
    return lin_pair


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ------------------------------------------------------------------ item 4: save atomicity
@pytest.mark.parametrize("step", ["write manifest", "replace 1", "replace 2", "replace 3"])
def test_a_failed_save_leaves_the_old_or_the_new_bundle(two, tmp_path, monkeypatch, step):
    old, new, x = two
    old.save(tmp_path)
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append(dst)
        if step == f"replace {len(calls)}":
            raise OSError("disk full")
        real_replace(src, dst)

    def write_text(self, *args, **kwargs):
        raise OSError("disk full")

    if step == "write manifest":
        monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(artifact.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path)
    monkeypatch.undo()
    got = mtcompile.load(tmp_path).run("lin", *x)[0]
    # Once the manifest is replaced (the 3rd rename moves the library into place) the new
    # bundle is the one that loads; before, the old one, untouched.
    want = new if step == "replace 3" else old
    np.testing.assert_array_equal(got, want.run("lin", *x)[0])
    staged = [n for n in _listing(tmp_path) if n.startswith(".bundle.so.")]
    assert _listing(tmp_path) == sorted(["bundle.so", MANIFEST, *staged])
    assert len(staged) == (step == "replace 3")
    if step == "replace 3":  # the same bytes saved again, stopping at the manifest: the
        calls.clear()  # staged library the manifest names stays
        monkeypatch.setattr(artifact.os, "replace", replace)
        step = "replace 2"
        with pytest.raises(OSError, match="disk full"):
            new.save(tmp_path)
        monkeypatch.undo()
        np.testing.assert_array_equal(
            mtcompile.load(tmp_path).run("lin", *x)[0], new.run("lin", *x)[0]
        )
    new.save(tmp_path)  # a later save completes and tidies up
    assert _listing(tmp_path) == ["bundle.so", MANIFEST]
    np.testing.assert_array_equal(mtcompile.load(tmp_path).run("lin", *x)[0], new.run("lin", *x)[0])


def test_save_onto_a_regular_file_is_an_artifact_error(two, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match=f"cannot save a bundle to {f}: it is a file"):
        two[0].save(f)
    with pytest.raises(ArtifactError, match=f"cannot save a bundle to {f / 'sub'}"):
        two[0].save(f / "sub")
    assert f.read_text() == "x"


def test_a_resaved_bundle_has_the_modes_of_a_fresh_save(two, tmp_path):
    mask = os.umask(0o027)
    try:
        two[0].save(tmp_path / "fresh")
        mtcompile.load(tmp_path / "fresh").save(tmp_path / "again")
    finally:
        os.umask(mask)
    for d in ("fresh", "again"):
        assert (tmp_path / d / "bundle.so").stat().st_mode & 0o777 == 0o750
        assert (tmp_path / d / MANIFEST).stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------ item 8a: signatures
def _set_bias(lib: Path, model, value: float) -> None:
    """Overwrite the first bias of `model`'s linear layer inside the library."""
    data = bytearray(lib.read_bytes())
    at = data.find(model.fc.bias.detach().numpy().tobytes())
    assert at > 0 and data.count(model.fc.bias.detach().numpy().tobytes()) == 1
    data[at : at + 4] = np.float32(value).tobytes()
    lib.write_bytes(bytes(data))


def _rehash(d: Path) -> None:
    m = json.loads((d / MANIFEST).read_text())
    m["library_sha256"] = artifact.sha256_file(d / "bundle.so")
    (d / MANIFEST).write_text(json.dumps(m))


def test_signed_bundle_refuses_a_library_changed_with_its_hash(two, tmp_path):
    b, _, x = two
    model = linear_relu(1)[0]  # the model `b` was compiled from (seeded)
    b.save(tmp_path, sign_key=b"pipeline secret")
    sig = json.loads((tmp_path / MANIFEST).read_text())["bundle_signature"]
    assert sig.startswith("hmac-sha256:") and len(sig) == len("hmac-sha256:") + 64
    loaded = mtcompile.load(tmp_path, verify_key=b"pipeline secret")
    np.testing.assert_array_equal(loaded.run("lin", *x)[0], b.run("lin", *x)[0])
    assert mtcompile.load(tmp_path, verify_key="pipeline secret").tenant_names == ["lin"]
    with pytest.raises(ArtifactError, match=f"{tmp_path / MANIFEST}: signature does not match"):
        mtcompile.load(tmp_path, verify_key=b"another key")
    # A weight changed in the library, the manifest's hash updated to match.
    _set_bias(tmp_path / "bundle.so", model, 1e6)
    _rehash(tmp_path)
    with pytest.raises(ArtifactError, match=f"{tmp_path / MANIFEST}: signature does not match"):
        mtcompile.load(tmp_path, verify_key=b"pipeline secret")
    # Without a key load checks the hash only (accidental damage), as before: it runs.
    np.testing.assert_allclose(mtcompile.load(tmp_path).run("lin", *x)[0][:, 0], 1e6, atol=10)


def test_signature_covers_the_manifest_and_needs_a_signed_bundle(two, tmp_path):
    old, _, x = two
    old.save(tmp_path / "signed", sign_key=b"k")
    m = json.loads((tmp_path / "signed" / MANIFEST).read_text())
    m["tenants"]["lin"]["outputs"][0]["name"] = "renamed"
    (tmp_path / "signed" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="signature does not match"):
        mtcompile.load(tmp_path / "signed", verify_key=b"k")
    old.save(tmp_path / "plain")
    assert "bundle_signature" not in json.loads((tmp_path / "plain" / MANIFEST).read_text())
    with pytest.raises(
        ArtifactError, match=f"{tmp_path / 'plain' / MANIFEST}: the bundle is not signed"
    ):
        mtcompile.load(tmp_path / "plain", verify_key=b"k")
    # A loaded signed bundle saved again without a key is plainly unsigned (not a stale
    # signature), and with the key signed again; saving is deterministic.
    loaded = mtcompile.load(tmp_path / "plain")
    loaded.save(tmp_path / "resigned", sign_key=b"k")
    old.save(tmp_path / "signed2", sign_key=b"k")
    assert (tmp_path / "resigned" / MANIFEST).read_bytes() == (
        tmp_path / "signed2" / MANIFEST
    ).read_bytes()
    assert mtcompile.load(tmp_path / "resigned", verify_key=b"k").run("lin", *x)[0].shape == (2, 4)
    with pytest.raises(ArtifactError, match="sign_key must be non-empty bytes or str"):
        old.save(tmp_path / "bad", sign_key=b"")


# ------------------------------------------------------------------ item 8b: truncation
TRUNCATED_CHILD = textwrap.dedent("""
    import sys, mtcompile
    try:
        mtcompile.load(sys.argv[1])
    except mtcompile.errors.ArtifactError as e:
        print("ArtifactError:", e)
""")


def test_truncated_library_is_refused_and_leaves_no_temporary_copy(two, tmp_path):
    d = tmp_path / "bundle"
    two[0].save(d)
    lib = d / "bundle.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    _rehash(d)  # damage that the hash does not catch
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # A subprocess: before, this load died with SIGBUS.
    proc = subprocess.run(
        [sys.executable, "-c", TRUNCATED_CHILD, str(d)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"ArtifactError: {lib}: cannot be loaded by TVM: truncated")
    assert list(tmp.iterdir()) == []


# ------------------------------------------------------------------ item 8d: repeated loads
def _mapped_copies() -> set[str]:
    """The private library copies this process has mapped (a leak grows this set)."""
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[-1].strip() for line in f if "/mtcompile-" in line}


def test_loading_the_same_bundle_again_maps_no_new_library(two, tmp_path):
    old, _, x = two
    old.save(tmp_path)
    first = mtcompile.load(tmp_path)
    mapped = _mapped_copies()
    for _ in range(4):
        again = mtcompile.load(tmp_path)
        np.testing.assert_array_equal(again.run("lin", *x)[0], first.run("lin", *x)[0])
        del again
    assert _mapped_copies() == mapped


# ------------------------------------------------------------------ item 6: dtypes
class LinearReLU16(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)  # seed 0 gives ReLU outputs of zero: a check of nothing
            self.fc = torch.nn.Linear(8, 4, bias=bias)

    def forward(self, x):
        return torch.relu(self.fc(x))


class ConvNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return torch.softmax(self.norm(self.conv(x)), -1)


class BF16Weights(torch.nn.Module):
    """bfloat16 weights between float32 input and output (numpy has no bfloat16)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(8, 4).to(torch.bfloat16)

    def forward(self, x):
        return self.fc(x.to(torch.bfloat16)).float()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.slow  # compiles a bundle of its own
def test_float16_model_keeps_float16_outputs(bias):
    # Before: float32 outputs without a bias; with one the import failed (fp16 + fp32 add).
    m = LinearReLU16(bias).half().eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)).half()
    b = mtcompile.compile([mtcompile.Tenant("h", m, example_inputs=(x,))])
    assert b.signature("h").outputs[0].dtype == "float16"
    (got,) = b.run("h", x)
    want = m(x).detach().numpy()
    assert got.dtype == want.dtype == np.float16
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    assert b.verify()["ok"]


@pytest.mark.slow  # compiles a bundle of its own
def test_verify_tolerance_follows_the_dtype():
    m = ConvNorm().half().eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    b = mtcompile.compile([mtcompile.Tenant("c", m, example_inputs=(x,))])
    r = b.verify()
    assert r["ok"] and r["tenants"]["c"]["precision"] == "float16"
    assert r["tenants"]["c"]["outputs"][0]["atol"] == 1e-2
    assert not b.verify(atol=1e-9, rtol=0.0)["ok"]  # a given tolerance still applies


def test_verify_compares_integers_exactly_and_checks_dtypes():
    from mtcompile.tools.verify import compare

    ints = np.array([3, 4], np.int64)
    assert not compare([ints + 1], [ints], atol=10.0)["ok"]
    assert compare([ints], [ints], atol=0.0)["ok"]
    f = np.ones(2, np.float32)
    r = compare([f.astype(np.float16)], [f])
    assert not r["ok"] and r["outputs"][0]["error"] == "float16[2] vs source float32[2]"


@pytest.mark.slow  # compiles a bundle of its own
def test_bfloat16_weights_compile_and_verify():
    # Before: a raw TypeError from numpy in the source hash.
    m = BF16Weights().eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    b = mtcompile.compile([mtcompile.Tenant("bf", m, example_inputs=(x,))])
    r = b.verify()
    assert r["ok"] and r["tenants"]["bf"]["precision"] == "bfloat16"
    np.testing.assert_allclose(b.run("bf", x)[0], m(x).detach().numpy(), atol=5e-2)
    other = BF16Weights().eval()
    with torch.no_grad():
        other.fc.weight[0, 0] += 1
    b2 = mtcompile.compile([mtcompile.Tenant("bf", other, example_inputs=(x,))])
    assert b2.manifest.tenants["bf"].source_sha256 != b.manifest.tenants["bf"].source_sha256


# ------------------------------------------------------------------ item 7: meta, sparse
def test_meta_and_sparse_tensors_are_refused_by_name(two):
    m, x = linear_relu(0)
    cases = [
        ((torch.empty(2, 8, device="meta"),), m, "example input 0 is a meta tensor"),
        ((x[0].to_sparse(),), m, "example input 0 is a sparse tensor (layout torch.sparse_coo)"),
        (x, linear_relu(0)[0].to("meta"), "weight 'fc.weight' is a meta tensor"),
    ]
    sparse = linear_relu(0)[0]
    sparse.register_buffer("table", torch.eye(3).to_sparse())
    cases.append((x, sparse, "weight 'table' is a sparse tensor"))
    for inputs, model, msg in cases:
        with pytest.raises(MTCompileError, match=re.escape(f"tenant 'lin': {msg}")):
            mtcompile.compile([mtcompile.Tenant("lin", model, example_inputs=inputs)])
    b = two[0]
    with pytest.raises(
        MTCompileError,
        match=re.escape(
            "tenant 'lin', input 'x': expected dense float32[2, 8] data, got a meta tensor"
        ),
    ):
        b.run("lin", torch.empty(2, 8, device="meta"))
    with pytest.raises(
        MTCompileError,
        match=re.escape(
            "tenant 'lin', input 'x': expected dense float32[2, 8] data, got a sparse tensor"
        ),
    ):
        b.run_all({"lin": (x[0].to_sparse(),)})


class TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)  # seed 0 gives ReLU outputs of zero: a check of nothing
            self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)), x.sum(-1)


@pytest.mark.slow  # compiles a bundle of its own
def test_bfloat16_inputs_and_outputs_cross_as_ml_dtypes_arrays(tmp_path):
    # Before: a bfloat16 model did not import (fp32 matmul + bf16 bias); numpy has no
    # bfloat16, so tensors cross as ml_dtypes' (TVM's own) bfloat16 arrays.
    m = TwoOutputs().bfloat16().eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    b = mtcompile.compile([mtcompile.Tenant("bf", m, example_inputs=(x,))])
    assert [o.dtype for o in b.signature("bf").outputs] == ["bfloat16", "bfloat16"]
    got = b.run("bf", x)
    assert [str(g.dtype) for g in got] == ["bfloat16", "bfloat16"]
    want = m(x)[0].float().detach().numpy()
    np.testing.assert_allclose(got[0].astype(np.float32), want, atol=1e-2)
    as_numpy = x.view(torch.int16).numpy().view(got[0].dtype)  # the same values, numpy
    together = b.run_all({"bf": (as_numpy,)})["bf"]
    with pytest.raises(MTCompileError, match=re.escape("expected bfloat16[2, 8], got float32")):
        b.run("bf", x.float())
    assert all(np.array_equal(g, t) for g, t in zip(got, together, strict=True))
    r = b.verify()
    assert r["ok"] and r["tenants"]["bf"]["precision"] == "bfloat16"
    b.save(tmp_path)
    assert str(mtcompile.load(tmp_path).run("bf", x)[0].dtype) == "bfloat16"
