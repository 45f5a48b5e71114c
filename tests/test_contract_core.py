"""One artifact contract, one native core (issue 25): the same damaged artifacts through the
Python runtime and ``mtcompile-run`` give the same refusal (`ArtifactError` / exit 3) with the
same first line; signatures required by flag or by ``MTCOMPILE_VERIFY_KEY``; the artifact
fuzzer, bounded."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import mtcompile
from mtcompile import fuzz_artifact
from mtcompile.errors import ArtifactError
from mtcompile.runtime import artifact
from mtcompile.runtime.abi import MANIFEST
from mtcompile.runtime.contract import VERIFY_KEY_ENV, file_name
from mtcompile.runtime.inputs import seeded_inputs

KEY = b"table key"


def _host_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


ABSENT = next(
    (
        f
        for f, flag in [
            ("xop", "xop"),
            ("fma4", "fma4"),
            ("amx-tile", "amx_tile"),
            ("avx512fp16", "avx512_fp16"),
        ]
        if flag not in _host_flags()
    ),
    None,
)


def _edit(change):
    def apply(d: Path) -> None:
        m = json.loads((d / MANIFEST).read_text())
        change(m)
        (d / MANIFEST).write_text(json.dumps(m))

    return apply


def _lib(d: Path) -> Path:
    return d / json.loads((d / MANIFEST).read_text())["library"]


def _flip(d: Path) -> None:
    b = bytearray(_lib(d).read_bytes())
    b[100] ^= 1
    _lib(d).write_bytes(bytes(b))


def _truncate_rehashed(d: Path) -> None:
    lib = _lib(d)
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    _edit(lambda m: m.__setitem__("library_sha256", artifact.sha256_file(lib)))(d)


def _out(m, t="a", i=0):
    return m["tenants"][t]["outputs"][i]


# name: (damage of an unsigned copy, or of a signed one ("signed ..."), the key each
# front-end is given (None, "good", "wrong"), require a signature, words of the first line)
CASES = {
    "library byte flipped": (_flip, None, False, "does not match"),
    "library truncated, rehashed": (_truncate_rehashed, None, False, "truncated"),
    "library missing": (lambda d: _lib(d).unlink(), None, False, "which is missing"),
    "library outside the bundle": (
        _edit(lambda m: m.__setitem__("library", "../b/x.so")),
        None,
        False,
        "is not a file name",
    ),
    "format": (
        _edit(lambda m: m.__setitem__("format", "mtcompile-bundle/3")),
        None,
        False,
        "format 'mtcompile-bundle/3'",
    ),
    "tvm version": (
        _edit(lambda m: m["versions"].__setitem__("tvm", "0.1.0")),
        None,
        False,
        "built with TVM 0.1.0",
    ),
    "cpu feature": (
        _edit(lambda m: m["cpu_features"].append(f"+{ABSENT}")),
        None,
        False,
        "this machine's CPU lacks",
    ),
    "weight offset moved": (
        _edit(lambda m: m["weights"]["tensors"][0].__setitem__(0, 64)),
        None,
        False,
        "weights.tensors[0].offset",
    ),
    "weight dtype": (
        _edit(lambda m: m["weights"]["tensors"][0].__setitem__(2, "float64")),
        None,
        False,
        "weights.",
    ),
    "weights table removed": (
        _edit(lambda m: m.pop("weights")),
        None,
        False,
        "(the table the library carries), found 0",
    ),
    "run_all input dropped": (
        _edit(lambda m: m["run_all_inputs"].pop()),
        None,
        False,
        "expected each tenant input once",
    ),
    "output renamed": (
        _edit(lambda m: _out(m).__setitem__("name", "renamed")),
        None,
        False,
        "disagree on ['tenants']",
    ),
    "output files collide": (
        _edit(lambda m: _out(m, "b").__setitem__("file", _out(m)["file"])),
        None,
        False,
        "is the file of another output",
    ),
    "output file unsafe": (
        _edit(lambda m: _out(m).__setitem__("file", "../x.npy")),
        None,
        False,
        "expected a file name of [A-Za-z0-9_.-]",
    ),
    "a pass made null (fuzzer seed 3, case 18)": (
        _edit(lambda m: m["pipeline"].__setitem__(1, None)),
        None,
        False,
        "disagree on ['pipeline']",
    ),
    "signature required, no key": (lambda d: None, None, True, "a verified signature is required"),
    "unsigned, a key given": (lambda d: None, "good", False, "the bundle is not signed"),
    "signed, wrong key": ("signed", "wrong", False, "signature does not match"),
    "signed, manifest edited": ("signed " + "edit", "good", True, "signature does not match"),
    "signed, library rehashed": ("signed rehash", "good", False, "signature does not match"),
}


@pytest.fixture(scope="module")
def weighty():
    """Tenants whose weights the library carries in its table (test_artifact_contract's
    Linear pair and embedding), compiled once."""
    from test_artifact_contract import tenants

    return mtcompile.compile(tenants())


@pytest.fixture(scope="module")
def weighty_saved(weighty, tmp_path_factory) -> Path:
    return weighty.save(tmp_path_factory.mktemp("weighty") / "bundle")


def _damaged(bundle, saved, tmp_path, damage) -> Path:
    d = tmp_path / "bundle"
    if isinstance(damage, str):  # a signed copy, then its damage
        bundle.save(d, sign_key=KEY)
        if damage.endswith("edit"):
            _edit(lambda m: _out(m).__setitem__("name", "renamed"))(d)
        elif damage.endswith("rehash"):
            _flip(d)
            _edit(lambda m: m.__setitem__("library_sha256", artifact.sha256_file(_lib(d))))(d)
    else:
        shutil.copytree(saved, d)
        damage(d)
    return d


def _python(d: Path, key, require: bool) -> str:
    with pytest.raises(ArtifactError) as e:
        b = mtcompile.load(d, verify_key=key, require_signature=require)
        b.run("a", *seeded_inputs(b.signature("a"), 0))
    return str(e.value).splitlines()[0]


def _driver(d: Path, keyfile, require: bool, work: Path, sig) -> subprocess.CompletedProcess:
    from mtcompile.driver import command

    ins, out = work / "in", work / "out"
    ins.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    for s, x in zip(sig.inputs, seeded_inputs(sig, 0), strict=True):
        np.save(ins / file_name("a", s.name), x)
    return subprocess.run(
        command(d, "a", ins, out, verify_key_file=keyfile, require_signature=require),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # the C++ driver: a process per case
@pytest.mark.parametrize("case", list(CASES))
def test_both_front_ends_refuse_a_damaged_artifact_with_the_same_first_line(
    weighty, weighty_saved, tmp_path, case, monkeypatch
):
    damage, key, require, words = CASES[case]
    if case == "cpu feature" and ABSENT is None:
        pytest.skip("this CPU has every feature tried")
    monkeypatch.delenv(VERIFY_KEY_ENV, raising=False)
    d = _damaged(weighty, weighty_saved, tmp_path, damage)
    keys = {None: None, "good": KEY, "wrong": b"another key"}
    keyfile = None
    if key is not None:
        keyfile = tmp_path / "key"
        keyfile.write_bytes(keys[key])
    py = _python(d, keys[key], require)
    res = _driver(d, keyfile, require, tmp_path, weighty.signature("a"))
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    line = res.stderr.strip().splitlines()[-1]
    assert line == f"mtcompile-run: {py}", (line, py)
    assert words in py, py


@pytest.mark.slow  # the C++ driver
def test_the_verify_key_of_the_environment_is_used_by_both(weighty, tmp_path, monkeypatch):
    d = weighty.save(tmp_path / "signed", sign_key=KEY)
    sig = weighty.signature("a")
    monkeypatch.setenv(VERIFY_KEY_ENV, KEY.decode())
    b = mtcompile.load(d, require_signature=True)
    assert b.signature_verified and b.report()["signature"]["verified"]
    res = _driver(d, None, True, tmp_path, sig)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    monkeypatch.setenv(VERIFY_KEY_ENV, "another key")
    py = _python(d, None, False)
    assert "signature does not match" in py
    res = _driver(d, None, False, tmp_path, sig)
    assert res.returncode == 3 and res.stderr.strip().splitlines()[-1] == f"mtcompile-run: {py}"


def test_require_signature_refuses_without_a_key_and_loads_with_one(
    tiny_bundle, tmp_path, monkeypatch
):
    monkeypatch.delenv(VERIFY_KEY_ENV, raising=False)
    plain = tiny_bundle.save(tmp_path / "plain")
    with pytest.raises(ArtifactError, match="a verified signature is required"):
        mtcompile.load(plain, require_signature=True)
    signed = tiny_bundle.save(tmp_path / "signed", sign_key=KEY)
    b = mtcompile.load(signed, verify_key=KEY, require_signature=True)
    assert b.report()["signature"]["verified"]
    assert not mtcompile.load(signed).signature_verified  # no key: loads, says unverified


def test_a_field_of_an_unforeseen_kind_is_refused_as_the_driver_refuses_it(tiny_saved, tmp_path):
    """Artifact fuzzer, seed 3, cases 18 and 119: a pass of the pipeline replaced by null
    gave a raw TypeError from the manifest reader; now the core's checks of the loaded
    library name it first, as mtcompile-run does."""
    d = shutil.copytree(tiny_saved, tmp_path / "bundle")
    _edit(lambda m: m["pipeline"].__setitem__(1, None))(d)
    with pytest.raises(ArtifactError, match=r"disagree on \['pipeline'\]"):
        mtcompile.load(d)


def test_artifact_fuzzer_bounded(tiny_saved):
    """A short slice of the artifact fuzzer: every case refused or the same outputs."""
    results = fuzz_artifact.run(tiny_saved, seed=0, count=12, progress=None)
    s = fuzz_artifact.summary(results)
    assert s["cases"] == 12 and s["ok"], [
        r for r in results if r["outcome"] not in ("refused", "same")
    ]
    assert s["refused"] > 0
