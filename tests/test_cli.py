"""The `mtcompile` command line and TOML specs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from mtcompile.cli import main
from mtcompile.errors import SpecError
from mtcompile.models import encoder_onnx
from mtcompile.passes import DEFAULT_PIPELINE
from mtcompile.tools.spec import load_spec

SMALL_MLP = 'factory = "mtcompile.models:mlp_fx"\nargs = { batch = 2, d_in = 16, hidden = 32, d_out = 8 }'


def write_spec(tmp_path: Path, body: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A bundle built by `mtcompile build` from a spec with an fx tenant and an ONNX file."""
    d = tmp_path_factory.mktemp("cli")
    model, _ = encoder_onnx(seed=3, seq=8, d_model=32, heads=2, layers=1, ffn=64)
    onnx.save(model, str(d / "enc.onnx"))
    spec = write_spec(d, f"""
name = "small"
[[tenants]]
name = "mlp"
{SMALL_MLP}
[[tenants]]
name = "enc"
onnx = "enc.onnx"
""")
    out = d / "out"
    assert main(["build", str(spec), "-o", str(out)]) == 0
    return out


def test_build_writes_library_and_manifest(built, capsys):
    assert (built / "small.so").is_file()
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["tenant_order"] == ["mlp", "enc"]
    assert manifest["tenants"]["enc"]["source"] == "onnx"
    assert manifest["tenants"]["mlp"]["inputs"] == [
        {"name": "x", "shape": [2, 16], "dtype": "float32"}]


def test_build_prints_one_line_per_stage_and_numerics(tmp_path, capsys):
    spec = write_spec(tmp_path, f'[[tenants]]\nname = "m"\n{SMALL_MLP}\n')
    assert main(["build", str(spec), "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    for stage in ("import", "merge", "passes", "lower", "build", "verify"):
        assert any(line.startswith(stage) and line.rstrip().endswith(" s")
                   for line in out.splitlines()), stage
    assert "numerics: PASS" in out


def test_inspect_summarizes(built, capsys):
    assert main(["inspect", str(built)]) == 0
    out = capsys.readouterr().out
    assert "bundle 'small'" in out
    assert "mlp" in out and "enc" in out and "run_all" in out
    assert "x: float32[2, 16]" in out


def test_inspect_json_is_the_manifest(built, capsys):
    assert main(["inspect", str(built), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "small"


def test_run_writes_outputs_matching_the_api(built, tmp_path):
    import mtcompile

    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(built), "--tenant", "mlp", "--input", f"x={tmp_path / 'x.npy'}",
                 "-o", str(tmp_path / "res")]) == 0
    got = np.load(tmp_path / "res" / "mlp.output0.npy")
    want = mtcompile.load(built).run("mlp", x)[0]
    np.testing.assert_array_equal(got, want)


def test_run_with_wrong_input_name_fails_clearly(built, tmp_path, capsys):
    np.save(tmp_path / "y.npy", np.zeros((2, 16), np.float32))
    code = main(["run", str(built), "--tenant", "mlp", "--input", f"y={tmp_path / 'y.npy'}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "tenant 'mlp' takes inputs (x: float32[2, 16])" in err and "['y']" in err


def test_run_unknown_tenant_fails_clearly(built, capsys):
    assert main(["run", str(built), "--tenant", "nope"]) == 1
    assert "unknown tenant 'nope'" in capsys.readouterr().err


def test_build_bad_pass_name_fails_before_compiling(tmp_path, capsys):
    spec = write_spec(tmp_path, f'[[tenants]]\nname = "m"\n{SMALL_MLP}\n')
    assert main(["build", str(spec), "-o", str(tmp_path / "o"), "--passes", "no-such"]) == 1
    assert "unknown pass 'no-such'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dump_passes_writes_graphs(tmp_path):
    spec = write_spec(tmp_path, f'[[tenants]]\nname = "m"\n{SMALL_MLP}\n')
    dump = tmp_path / "dump"
    assert main(["build", str(spec), "-o", str(tmp_path / "o"), "--no-verify",
                 "--dump-passes", str(dump)]) == 0
    expected = [f"{i + 1:03d}_{name}.txt" for i, name in enumerate(DEFAULT_PIPELINE)]
    assert sorted(p.name for p in dump.iterdir()) == ["000_input.txt", *expected]
    assert "%m.x = input()" in (dump / "000_input.txt").read_text()


@pytest.mark.parametrize("body, message", [
    ("", "needs at least one [[tenants]] table"),
    ("[[tenants]]\nfactory = 'x:y'\n", "needs a name"),
    ("[[tenants]]\nname = 'a'\n", "exactly one of 'factory' or 'onnx'"),
    ("[[tenants]]\nname = 'a'\nfactory = 'nomodule_xyz:f'\n", "cannot import factory"),
    ("[[tenants]]\nname = 'a'\nfactory = 'mtcompile.models'\n", "must look like"),
    ("[[tenants]]\nname = 'a'\nfactory = 'mtcompile.models:mlp'\nargs = { nope = 1 }\n",
     "rejected args"),
    ("[[tenants]]\nname = 'a'\nonnx = 'x.onnx'\ncolour = 1\n", "unknown key(s) ['colour']"),
    ("tenant = 1\n", "unknown key(s) ['tenant']"),
    ("[[tenants]]\nname = 'a'\nonnx = 'x.onnx'\ninput_shapes = { x = [1, 2] }\n",
     "input_shapes.x must be"),
    ("[[tenants\n", "invalid TOML"),
    ("[[tenants]]\nname = '9bad'\nonnx = 'x.onnx'\n", "is not valid"),
])
def test_bad_specs_name_the_problem(tmp_path, body, message):
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, body))
    assert message in str(e.value)
    assert "spec.toml" in str(e.value)


def test_missing_spec_file(tmp_path, capsys):
    assert main(["build", str(tmp_path / "none.toml"), "-o", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_spec_defaults_and_pipeline(tmp_path):
    spec = load_spec(write_spec(tmp_path, f"""
[pipeline]
passes = []
[[tenants]]
name = "m"
{SMALL_MLP}
""", name="mybundle.toml"))
    assert spec.name == "mybundle" and spec.target == "llvm" and spec.passes == []
    assert spec.tenants[0].input_shapes == {"x": ((2, 16), "float32")}


def test_bundled_demo_spec_parses():
    spec = load_spec(Path(__file__).parents[1] / "models" / "heterogeneous.toml")
    assert [t.name for t in spec.tenants] == ["vision", "text", "mlp"]


def test_passes_lists_the_registry(capsys):
    assert main(["passes"]) == 0
    assert "eliminate-dead-nodes (default)" in capsys.readouterr().out


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "mtcompile", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0
    for cmd in ("build", "run", "inspect", "demo"):
        assert cmd in res.stdout


@pytest.mark.slow
def test_demo_builds_runs_and_checks_numerics(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "numerics: PASS" in out
    assert out.count(" ok ") == 3  # vision, text, mlp: one output each
    assert (tmp_path / "demo" / "heterogeneous.so").is_file()


def test_cli_error_is_one_clear_line_not_a_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mtcompile", "inspect", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.startswith("mtcompile: error:") and "Traceback" not in res.stderr
    assert "no manifest.json" in res.stderr


