"""The artifact contract (issue 25), in both runtimes: the weights table is bound to the
library and bounds-checked, the driver checks the library (hash, ELF, embedded manifest,
signature) and the manifest's fields as `mtcompile.load` does, and the minor findings
(cache directory, output file names, .npy files, keys on the CLI, signed bundles said)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mtcompile
from mtcompile.errors import ArtifactError
from mtcompile.runtime import artifact, contract
from mtcompile.runtime.abi import MANIFEST


class Lin(nn.Module):
    """Linear(32 -> 16): a 2 KiB weight, which the library carries in its weights table."""

    def __init__(self, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc = nn.Linear(32, 16)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Emb(nn.Module):
    """Embedding(64, 16): an index input whose manifest says its range [0, 64)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            self.emb = nn.Embedding(64, 16)

    def forward(self, ids):
        return self.emb(ids) * 2.0


X = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
IDS = torch.tensor([[1, 2, 3, 63], [0, 5, 9, 60]])


def tenants() -> list[mtcompile.Tenant]:
    return [
        mtcompile.Tenant("a", Lin(1), example_inputs=(X,)),
        mtcompile.Tenant("b", Lin(2), example_inputs=(X,)),
        mtcompile.Tenant("emb", Emb(), example_inputs=(IDS,)),
    ]


@pytest.fixture(scope="module")
def built():
    """The three tenants compiled once."""
    return mtcompile.compile(tenants())


@pytest.fixture
def saved(built, tmp_path) -> Path:
    """A fresh copy of the bundle, which the test may damage."""
    return built.save(tmp_path / "bundle")


def edit(d: Path, change) -> None:
    """Apply `change` to the manifest's JSON dict in place."""
    m = json.loads((d / MANIFEST).read_text())
    change(m)
    (d / MANIFEST).write_text(json.dumps(m))


def in_child(code: str, *args) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a signal kills the child, not the test)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


LOAD_RUN = """
    import sys, numpy as np, mtcompile
    try:
        b = mtcompile.load(sys.argv[1])
        print("ran", b.run("a", np.ones((2, 32), np.float32))[0].sum())
    except mtcompile.errors.MTCompileError as e:
        print(type(e).__name__ + ":", e)
"""


# ------------------------------------------------------------------ item 1: weights table
def _weights(m) -> dict:
    return m["weights"]


WEIGHT_EDITS = {
    # name: (edit of the first weight row, words the refusal says)
    "offset past the file": (
        lambda r: r.__setitem__(0, 1 << 40),
        ["weights.tensors[0] (weight 0): extent", "to end within", "found its end at byte 1099511"],
    ),
    "negative offset": (
        lambda r: r.__setitem__(0, -64),
        ["weights.tensors[0] (weight 0): offset", "expected >= 0 and a multiple of 64, found -64"],
    ),
    "misaligned offset": (
        lambda r: r.__setitem__(0, r[0] + 4),
        ["weights.tensors[0] (weight 0): offset", "multiple of 64"],
    ),
    "huge shape": (
        lambda r: r.__setitem__(1, [1 << 40, 1 << 40]),
        ["weights.tensors[0] (weight 0): extent", "found its end beyond byte 2**62"],
    ),
    "negative dim": (
        lambda r: r.__setitem__(1, [-1, 32]),
        ["weights.tensors[0] (weight 0): shape: expected dims >= 0, found [-1, 32]"],
    ),
    "unknown dtype": (
        lambda r: r.__setitem__(2, "float99"),
        ["weights.tensors[0] (weight 0): dtype: expected one of float32", "found 'float99'"],
    ),
    "another dtype": (
        lambda r: r.__setitem__(2, "int8"),
        ["weights.tensors[0].dtype: expected float32 (the table the library carries), found int8"],
    ),
    "offset moved inside": (
        lambda r: r.__setitem__(0, 0 if r[0] else 64),
        ["weights.tensors[0].offset: expected", "(the table the library carries)"],
    ),
}


@pytest.mark.parametrize("case", list(WEIGHT_EDITS))
def test_an_edited_weights_table_is_refused_at_load(saved, case):
    change, words = WEIGHT_EDITS[case]
    assert len(_weights(json.loads((saved / MANIFEST).read_text()))["tensors"]) >= 2
    edit(saved, lambda m: change(_weights(m)["tensors"][0]))
    res = in_child(LOAD_RUN, saved)  # before: SIGSEGV, wrong numbers or a raw error
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"ArtifactError: {saved / MANIFEST}: weights."), res.stdout
    for w in words:
        assert w in res.stdout, res.stdout


def test_table_bytes_are_checked(saved):
    size = _weights(json.loads((saved / MANIFEST).read_text()))["bytes"]
    edit(saved, lambda m: _weights(m).__setitem__("bytes", 1 << 40))
    with pytest.raises(
        ArtifactError,
        match=r"weights.bytes: expected at most the \d+ bytes "
        "of the library's weights symbol",
    ):
        mtcompile.load(saved)
    edit(saved, lambda m: _weights(m).__setitem__("bytes", size - 64))
    with pytest.raises(
        ArtifactError,
        match=r"weights.bytes: expected \d+ \(the table the "
        r"library carries\), found \d+",
    ):
        mtcompile.load(saved)


def test_a_refused_table_leaves_the_untouched_bundle_right(built, saved, tmp_path):
    """Modules are cached by library hash: a bundle refused for its table must not leave
    its views for the untouched bundle loaded next (before: both ran wrong)."""
    good = built.save(tmp_path / "good")
    edit(saved, lambda m: WEIGHT_EDITS["offset moved inside"][0](_weights(m)["tensors"][0]))
    with pytest.raises(ArtifactError, match="the table the library carries"):
        mtcompile.load(saved)
    x = X.numpy()
    np.testing.assert_array_equal(mtcompile.load(good).run("a", x)[0], built.run("a", x)[0])
    with pytest.raises(ArtifactError, match="the table the library carries"):
        mtcompile.load(saved)  # and the cached module does not let it through afterwards


def test_a_library_without_its_table_is_refused(saved):
    edit(saved, lambda m: m.pop("weights"))
    with pytest.raises(
        ArtifactError,
        match=r"weights: expected \d+ weights \(the table the "
        r"library carries\), found 0",
    ):
        mtcompile.load(saved)


def test_weight_rules_check_the_table_the_library_carries():
    from mtcompile.runtime.weights import table_json

    table = table_json(
        mtcompile.runtime.manifest.WeightsInfo(
            "mtcompile_weights", 96, ((0, (4, 4), "float32"), (64, (8,), "float64")), {}
        )
    )
    contract.check_table(table, 128, "lib")  # the runtime core's rules, bound
    with pytest.raises(
        ArtifactError,
        match=r"lib: weights.tensors\[1\] \(weight 1\): extent: "
        "expected float64\\[8\\] at offset 64 to end "
        "within the 100 bytes",
    ):
        contract.check_table(table, 100, "lib")


# ------------------------------------------------------------------ item 3 (Python side)
def test_run_all_inputs_must_name_each_tenant_input_once(saved):
    edit(saved, lambda m: m["run_all_inputs"].pop())
    with pytest.raises(
        ArtifactError, match="key 'run_all_inputs': expected each tenant input once"
    ):
        mtcompile.load(saved)


def _swap_run_all_inputs(m) -> None:
    r = m["run_all_inputs"]
    r[0], r[1] = r[1], r[0]


def test_swapped_run_all_inputs_are_refused(saved):
    edit(saved, _swap_run_all_inputs)
    with pytest.raises(ArtifactError, match=r"disagree on \['run_all_inputs'\]"):
        mtcompile.load(saved)


def test_library_outside_the_bundle_directory_is_refused(saved):
    edit(saved, lambda m: m.__setitem__("library", "../base/bundle.so"))
    with pytest.raises(
        ArtifactError, match="key 'library': '../base/bundle.so' is not a file name"
    ):
        mtcompile.load(saved)


# ------------------------------------------------------------------ the driver, same artifacts
def _driver_inputs(d: Path) -> Path:
    d.mkdir(exist_ok=True)
    np.save(d / "a.x.npy", X.numpy())
    np.save(d / "b.x.npy", X.numpy())
    np.save(d / "emb.ids.npy", IDS.numpy())
    return d


def drive(
    bundle: Path, entry: str = "a", inputs: Path | None = None, key=None, out: Path | None = None
) -> subprocess.CompletedProcess:
    from mtcompile.driver import command

    inputs = inputs or _driver_inputs(bundle.parent / "in")
    out = out or bundle.parent / "out"
    out.mkdir(exist_ok=True)
    return subprocess.run(
        command(bundle, entry, inputs, out, verify_key_file=key),
        capture_output=True,
        text=True,
        timeout=300,
    )


def refused(res: subprocess.CompletedProcess, *words: str) -> str:
    """The driver's line of refusal (exit 3) holding `words` (TVM's own loader may log
    before it)."""
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("mtcompile-run: "), line
    for w in words:
        assert w in line, line
    return line


@pytest.mark.slow
def test_driver_runs_the_good_bundle_as_python(built, saved):
    res = drive(saved, "run_all")
    assert res.returncode == 0, res.stderr
    want = built.run_all({"a": (X,), "b": (X,), "emb": (IDS,)})
    for t in ("a", "b", "emb"):
        np.testing.assert_array_equal(
            np.load(saved.parent / "out" / f"{t}.output0.npy"), want[t][0]
        )


@pytest.mark.slow
@pytest.mark.parametrize("case", list(WEIGHT_EDITS))
def test_driver_refuses_an_edited_weights_table_as_python(saved, case):
    change, words = WEIGHT_EDITS[case]
    edit(saved, lambda m: change(_weights(m)["tensors"][0]))
    line = refused(drive(saved, "a"), f"{saved / MANIFEST}: weights.", *words)
    with pytest.raises(ArtifactError) as e:  # the same words in both runtimes
        mtcompile.load(saved)
    assert line == f"mtcompile-run: {e.value}"


def _rehash(d: Path) -> None:
    edit(d, lambda m: m.__setitem__("library_sha256", artifact.sha256_file(d / "bundle.so")))


@pytest.mark.slow
def test_driver_checks_the_library_before_loading_it(built, saved, tmp_path):
    lib = saved / "bundle.so"
    good = lib.read_bytes()
    lib.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # one byte flipped
    refused(
        drive(saved),
        f"{lib} does not match {saved / MANIFEST}: library sha256",
        "the files come from different builds",
    )
    other = mtcompile.compile([mtcompile.Tenant("a", Lin(5), example_inputs=(X,))])
    shutil.copyfile(other.save(tmp_path / "other") / "bundle.so", lib)  # another build's
    refused(drive(saved), "does not match", "the files come from different builds")
    lib.write_bytes(good[: len(good) // 2])  # truncated, the hash updated (before: SIGBUS)
    _rehash(saved)
    refused(drive(saved), f"{lib}: cannot be loaded by TVM: truncated")
    lib.unlink()  # before: exit 4
    refused(drive(saved), f"{saved}: the manifest names library 'bundle.so', which is missing")


@pytest.mark.slow
def test_driver_verifies_signatures(built, tmp_path):
    signed = built.save(tmp_path / "signed", sign_key=b"pipeline secret")
    key, wrong = tmp_path / "key", tmp_path / "wrong"
    key.write_text("pipeline secret\n")  # one trailing newline is not part of the key
    wrong.write_text("another key")
    res = drive(signed, "emb", key=key)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    res = drive(signed, "emb")  # runs, and says that nothing checked the signature
    assert (
        res.returncode == 0
        and (
            f"mtcompile-run: warning: {signed}: the bundle is signed; its signature is NOT verified"
        )
        in res.stderr
    ), res.stderr
    refused(drive(signed, "emb", key=wrong), f"{signed / MANIFEST}: signature does not match")
    plain = built.save(tmp_path / "plain")
    refused(drive(plain, "emb", key=key), "the bundle is not signed, and a verify key was given")
    edit(signed, lambda m: m["tenants"]["a"]["outputs"][0].__setitem__("name", "renamed"))
    refused(drive(signed, "emb", key=key), "signature does not match")


@pytest.mark.slow
def test_driver_checks_the_manifest_as_python(saved):
    """Before: index_range removed, an id of 10**9 segfaulted; swapped run_all_inputs fed
    each tenant the other's input; a library outside the bundle was followed."""
    original = (saved / MANIFEST).read_text()
    edits = {
        "index_range": (
            lambda m: m["tenants"]["emb"]["inputs"][0].pop("index_range"),
            "disagree on ['tenants']",
        ),
        "run_all_inputs": (_swap_run_all_inputs, "disagree on ['run_all_inputs']"),
        "library": (
            lambda m: m.__setitem__("library", "../base/bundle.so"),
            "key 'library': '../base/bundle.so' is not a file name",
        ),
        "missing": (lambda m: m.pop("graph"), "key 'graph': missing"),
        "dropped input": (
            lambda m: m["run_all_inputs"].pop(),
            "key 'run_all_inputs': expected each tenant input once",
        ),
    }
    for what, (change, words) in edits.items():
        (saved / MANIFEST).write_text(original)
        edit(saved, change)
        line = refused(drive(saved, "run_all"), words)
        with pytest.raises(ArtifactError) as e:
            mtcompile.load(saved)
        assert words in str(e.value), (what, str(e.value))
        assert line.endswith(words) or words in line, what


@pytest.mark.slow
def test_driver_refuses_index_inputs_outside_their_range(saved, tmp_path):
    inputs = _driver_inputs(tmp_path / "in")
    for bad in (500, 10**9):
        ids = IDS.numpy().copy()
        ids[1, 2] = bad
        np.save(inputs / "emb.ids.npy", ids)
        refused(
            drive(saved, "emb", inputs),
            "tenant 'emb', input 'ids'",
            f"values index a table of 64 rows and must be in [0, 64); got values in [0, {bad}]",
        )


# ------------------------------------------------------------------ item 5: minor findings
def _onnx_odd_output():
    """Relu(x) @ W: the output named ``out/y:0`` (a TF-converted model's name), and its
    Relu named ``out_y_0``: the same safe file name (issue 25: they collided)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(32 * 16, dtype=np.float32).reshape(32, 16) / 512, "w")
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["out/y:0"]),
            helper.make_node("Relu", ["out/y:0"], ["out_y_0"]),
        ],
        "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [
            helper.make_tensor_value_info("out/y:0", TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info("out_y_0", TensorProto.FLOAT, [2, 16]),
        ],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("odd")
    b = mtcompile.compile([mtcompile.Tenant("o", _onnx_odd_output())])
    outs = b.manifest.tenants["o"].outputs
    assert [o.name for o in outs] == ["out/y:0", "out_y_0"]
    assert [o.file for o in outs] == ["o.out_y_0.npy", "o.out_y_0_2.npy"]  # recorded
    return b.save(d / "bundle"), b.run("o", X.numpy())


def test_output_names_become_safe_file_names(odd, tmp_path):
    from mtcompile.cli import main

    saved, want = odd
    np.save(tmp_path / "x.npy", X.numpy())
    assert (
        main(
            [
                "run",
                str(saved),
                "--tenant",
                "o",
                "--input",
                f"x={tmp_path / 'x.npy'}",
                "-o",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )  # before: exit 4
    assert contract.file_name("o", "out/y:0") == "o.out_y_0.npy"
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "o.out_y_0.npy"), want[0])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "o.out_y_0_2.npy"), want[1])


def test_output_files_are_safe_unique_and_deterministic():
    from mtcompile.runtime.manifest import output_files

    assert output_files({"t": ["a/b", "a_b", "A_B", "ok"], "u": ["a/b"]}) == {
        "t": ["t.a_b.npy", "t.a_b_2.npy", "t.A_B_3.npy", "t.ok.npy"],
        "u": ["u.a_b.npy"],
    }
    # across tenants too: tenant 'a.b' output 'c' and tenant 'a' output 'b.c'
    assert output_files({"a.b": ["c"], "a": ["b.c"]}) == {
        "a.b": ["a.b.c.npy"],
        "a": ["a.b.c_2.npy"],
    }


@pytest.mark.slow
def test_driver_writes_the_same_safe_file_names(odd, tmp_path):
    saved, want = odd
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "o.x.npy", X.numpy())
    res = drive(saved, "o", tmp_path / "in", out=tmp_path / "out")  # before: "cannot write"
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "o.out_y_0.npy"), want[0])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "o.out_y_0_2.npy"), want[1])


def test_run_refuses_a_file_as_output_directory_and_a_device_as_input(odd, tmp_path, capsys):
    from mtcompile.cli import main

    saved, _ = odd
    np.save(tmp_path / "x.npy", X.numpy())
    (tmp_path / "file").write_text("")
    args = ["run", str(saved), "--tenant", "o", "--input", f"x={tmp_path / 'x.npy'}"]
    assert main([*args, "-o", str(tmp_path / "file")]) == 1  # before: exit 4 FileExistsError
    assert f"-o {tmp_path / 'file'}: is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "zero.npy").symlink_to("/dev/zero")
    assert (
        main(
            [
                "run",
                str(saved),
                "--tenant",
                "o",
                "--input",
                f"x={tmp_path / 'zero.npy'}",
                "-o",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert f"--input x: {tmp_path / 'zero.npy'} is not a regular file" in capsys.readouterr().err


NPY_HEADERS = {
    # name: (the file's bytes, words the refusal says); before: exit 4 (stoll, substr)
    "shape not numbers": (
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (a, b), }",
        "shape (a, b) is malformed",
    ),
    "unterminated descr": (b"{'descr': '<f4", "'descr' is malformed"),
    "no shape": (b"{'descr': '<f4', 'fortran_order': False}", "header has no 'shape'"),
    "descr at the end": (b"{'descr':", ".npy header has no 'descr'"),
}


@pytest.mark.slow
def test_driver_refuses_malformed_npy_files(saved, tmp_path):
    inputs = _driver_inputs(tmp_path / "in")
    for header, words in NPY_HEADERS.values():
        (inputs / "a.x.npy").write_bytes(
            b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
        )
        refused(drive(saved, "a", inputs), str(inputs / "a.x.npy"), words)
    np.save(inputs / "a.x.npy", X.numpy())
    data = (inputs / "a.x.npy").read_bytes()
    (inputs / "a.x.npy").write_bytes(data[:-4])  # a header promising more than the file has
    refused(drive(saved, "a", inputs), "252 data bytes, its header's float32[2, 32] needs 256")
    (inputs / "a.x.npy").unlink()
    (inputs / "a.x.npy").symlink_to("/dev/zero")  # before: read until bad_alloc
    refused(drive(saved, "a", inputs), f"{inputs / 'a.x.npy'}: not a regular file")


def test_an_unusable_cache_directory_fails_before_compiling(tmp_path, monkeypatch, capsys):
    from mtcompile import api
    from mtcompile.cli import main

    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "cache"

    def no_import(*args, **kwargs):
        raise AssertionError("compiled before checking the cache directory")

    monkeypatch.setattr(api, "_import", no_import)
    with pytest.raises(
        mtcompile.errors.MTCompileError,
        match=f"build cache directory {bad} cannot be used: Not a directory",
    ):
        mtcompile.compile(tenants(), cache=bad)
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[[tenants]]\nname = "m"\nfactory = "mtcompile.models:mlp_fx"\n'
        "args = { batch = 2, d_in = 16, hidden = 32, d_out = 8 }\n"
    )
    assert main(["build", str(spec), "-o", str(tmp_path / "o"), "--cache-dir", str(bad)]) == 1
    assert (
        f"mtcompile: error: build cache directory {bad} cannot be used" in capsys.readouterr().err
    )


@pytest.mark.slow  # builds a bundle through the CLI
def test_cli_signs_verifies_and_says_whether_a_bundle_is_signed(tmp_path, capsys):
    from mtcompile.cli import main

    key, wrong = tmp_path / "key", tmp_path / "wrong"
    key.write_text("pipeline secret\n")
    wrong.write_text("another key\n")
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[[tenants]]\nname = "m"\nfactory = "mtcompile.models:mlp_fx"\n'
        "args = { batch = 2, d_in = 16, hidden = 32, d_out = 8 }\n"
    )
    out = tmp_path / "o"
    assert (
        main(
            [
                "build",
                str(spec),
                "-o",
                str(out),
                "--no-cache",
                "--no-verify",
                "--sign-key-file",
                str(key),
            ]
        )
        == 0
    )
    assert mtcompile.load(out, verify_key=b"pipeline secret").report()["signature"] == {
        "signed": True,
        "scheme": "hmac-sha256",
        "verified": True,
        "note": "signed and verified with the key given",
    }
    rep = mtcompile.load(out).report()["signature"]  # before: nothing said
    assert rep["signed"] and not rep["verified"] and "NOT verified" in rep["note"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "signature signed, NOT verified: no key was given" in capsys.readouterr().out
    assert main(["inspect", str(out), "--verify-key-file", str(key)]) == 0
    assert "signature signed and verified with the key given" in capsys.readouterr().out
    assert main(["inspect", str(out), "--verify-key", str(wrong)]) == 1
    assert "signature does not match" in capsys.readouterr().err
    assert main(["profile", str(out), "--repeat", "1", "--verify-key-file", str(wrong)]) == 1
    assert "signature does not match" in capsys.readouterr().err
    assert main(["profile", str(out), "--repeat", "1"]) == 0
    assert "its signature is NOT verified" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("what", ["tvm", "cpu"])
def test_driver_checks_the_host_as_python(saved, what):
    """A bundle built with another TVM, or for CPU features this host lacks (before: the
    driver ran it; a missing instruction dies with SIGILL)."""
    if what == "tvm":
        edit(saved, lambda m: m["versions"].__setitem__("tvm", "0.1.0"))
        words = "built with TVM 0.1.0, this process has TVM"
    else:
        if "xop" in (Path("/proc/cpuinfo").read_text().split()):
            pytest.skip("this CPU has AMD's XOP")
        edit(saved, lambda m: m.__setitem__("cpu_features", [*m["cpu_features"], "+xop"]))
        words = "whose features ['xop'] this machine's CPU lacks"
    line = refused(drive(saved, "a"), words)
    with pytest.raises(ArtifactError) as e:
        mtcompile.load(saved)
    assert line == f"mtcompile-run: {e.value}"


@pytest.mark.slow
def test_the_table_the_library_carries_is_checked_too(saved):
    """A library whose own table is bad (rebuilt by hand, the hash updated): refused by its
    rules, in both runtimes, before a byte of it is viewed."""
    lib = saved / "bundle.so"
    data = lib.read_bytes()
    size = _weights(json.loads((saved / MANIFEST).read_text()))["bytes"]
    old = f'"bytes":{size},'.encode()
    assert data.count(old) == 1
    new = f'"bytes":{"9" * len(str(size))},'.encode()
    lib.write_bytes(data.replace(old, new))
    _rehash(saved)
    words = (
        f"{lib}: weights.bytes: expected at most the {size} bytes of the library's "
        f"weights symbol 'mtcompile_weights', found {'9' * len(str(size))}"
    )
    line = refused(drive(saved, "a"), words)
    with pytest.raises(ArtifactError) as e:
        mtcompile.load(saved)
    assert line == f"mtcompile-run: {e.value}" == f"mtcompile-run: {words}"


TABLE_EDITS = {
    "float offset": (
        lambda w: w["tensors"][0].__setitem__(0, 64.5),
        "key 'weights.tensors[0].offset': expected an integer, found 64.5",
    ),
    "dtype not a string": (
        lambda w: w["tensors"][0].__setitem__(2, 5),
        "key 'weights.tensors[0]': expected [offset, shape, dtype], found [",
    ),
    "shape not integers": (
        lambda w: w["tensors"][0].__setitem__(1, [2, "x"]),
        "key 'weights.tensors[0].shape': expected a list of integers, found [2, 'x']",
    ),
    "args missing": (lambda w: w.pop("args"), "key 'weights.args': missing"),
    "bytes a string": (
        lambda w: w.__setitem__("bytes", "12288"),
        "key 'weights.bytes': expected int, found str '12288'",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TABLE_EDITS))
def test_a_malformed_weights_table_is_refused_in_the_same_words(saved, case):
    change, words = TABLE_EDITS[case]
    edit(saved, lambda m: change(_weights(m)))
    line = refused(drive(saved, "a"), f"{saved / MANIFEST} is corrupt: {words}")
    with pytest.raises(ArtifactError) as e:
        mtcompile.load(saved)
    assert line == f"mtcompile-run: {e.value}"
