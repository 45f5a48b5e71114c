"""The `mtcompile` command line and TOML specs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import mtcompile
from mtcompile.cli import EXIT_CODES, EXIT_INPUT, main
from mtcompile.errors import SpecError
from mtcompile.models import encoder_onnx
from mtcompile.passes import DEFAULT_PIPELINE
from mtcompile.tools.spec import load_spec

SMALL_MLP = (
    'factory = "mtcompile.models:mlp_fx"\nargs = { batch = 2, d_in = 16, hidden = 32, d_out = 8 }'
)


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
    spec = write_spec(
        d,
        f"""
name = "small"
[[tenants]]
name = "mlp"
{SMALL_MLP}
[[tenants]]
name = "enc"
onnx = "enc.onnx"
""",
    )
    out = d / "out"
    assert main(["build", str(spec), "-o", str(out), "--cache-dir", str(d / "cache")]) == 0
    return out


def test_build_writes_library_and_manifest(built, capsys):
    assert (built / "small.so").is_file()
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["tenant_order"] == ["mlp", "enc"]
    assert manifest["tenants"]["enc"]["source"] == "onnx"
    assert manifest["tenants"]["mlp"]["inputs"] == [
        {"name": "x", "shape": [2, 16], "dtype": "float32"}
    ]


@pytest.mark.slow  # builds a bundle of its own
def test_build_logs_one_line_per_stage_on_stderr_and_numerics_on_stdout(tmp_path, capsys):
    spec = write_spec(tmp_path, f'[[tenants]]\nname = "m"\n{SMALL_MLP}\n')
    assert main(["build", str(spec), "-o", str(tmp_path / "o"), "--no-cache"]) == 0
    res = capsys.readouterr()
    stages = ("import", "merge", "passes", "lower", "build", "save", "verify")
    for stage in stages:
        assert any(
            line.startswith(stage) and line.rstrip().endswith(" s") for line in res.err.splitlines()
        ), stage
    # saved first, then verified: a check that cannot run (or fails) keeps the bundle
    lines = res.err.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("saved "))) < lines.index(
        next(x for x in lines if x.startswith("verify"))
    )
    assert "numerics: PASS" in res.out and not any(
        x.startswith(stages) for x in res.out.splitlines()
    )
    # -q: warnings and errors only
    assert main(["build", str(spec), "-o", str(tmp_path / "o"), "--no-cache", "-q"]) == 0
    res = capsys.readouterr()
    assert res.err == "" and "numerics: PASS" in res.out


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
    assert (
        main(
            [
                "run",
                str(built),
                "--tenant",
                "mlp",
                "--input",
                f"x={tmp_path / 'x.npy'}",
                "-o",
                str(tmp_path / "res"),
            ]
        )
        == 0
    )
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


@pytest.mark.slow  # builds a bundle of its own
def test_dump_passes_writes_graphs(tmp_path):
    spec = write_spec(tmp_path, f'[[tenants]]\nname = "m"\n{SMALL_MLP}\n')
    dump = tmp_path / "dump"
    assert (
        main(
            [
                "build",
                str(spec),
                "-o",
                str(tmp_path / "o"),
                "--no-verify",
                "--dump-passes",
                str(dump),
            ]
        )
        == 0
    )
    expected = [f"{i + 1:03d}_{name}.txt" for i, name in enumerate(DEFAULT_PIPELINE)]
    assert sorted(p.name for p in dump.iterdir()) == ["000_input.txt", *expected]
    assert "%m.x = input()" in (dump / "000_input.txt").read_text()


@pytest.mark.parametrize(
    "body, message",
    [
        ("", "needs at least one [[tenants]] table"),
        ("[[tenants]]\nfactory = 'x:y'\n", "needs a name"),
        ("[[tenants]]\nname = 'a'\n", "exactly one of 'factory' or 'onnx'"),
        ("[[tenants]]\nname = 'a'\nfactory = 'nomodule_xyz:f'\n", "cannot import factory"),
        ("[[tenants]]\nname = 'a'\nfactory = 'mtcompile.models'\n", "must look like"),
        (
            "[[tenants]]\nname = 'a'\nfactory = 'mtcompile.models:mlp'\nargs = { nope = 1 }\n",
            "rejected args",
        ),
        ("[[tenants]]\nname = 'a'\nonnx = 'x.onnx'\ncolour = 1\n", "unknown key(s) ['colour']"),
        ("tenant = 1\n", "unknown key(s) ['tenant']"),
        (
            "[[tenants]]\nname = 'a'\nonnx = 'x.onnx'\ninput_shapes = { x = [1, 2] }\n",
            "input_shapes.x must be",
        ),
        ("[[tenants\n", "invalid TOML"),
        ("[[tenants]]\nname = '9bad'\nonnx = 'x.onnx'\n", "is not valid"),
        (
            "subsets = ['a']\n[[tenants]]\nname = 'a'\nonnx = 'x.onnx'\n",
            "subsets must be a list of lists of tenant names",
        ),
    ],
)
def test_bad_specs_name_the_problem(tmp_path, body, message):
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, body))
    assert message in str(e.value)
    assert "spec.toml" in str(e.value)


def test_missing_spec_file(tmp_path, capsys):
    assert main(["build", str(tmp_path / "none.toml"), "-o", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_spec_defaults_and_pipeline(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path,
            f"""
[pipeline]
passes = []
[[tenants]]
name = "m"
{SMALL_MLP}
""",
            name="mybundle.toml",
        )
    )
    assert spec.name == "mybundle" and spec.target == "llvm" and spec.passes == []
    assert spec.tenants[0].input_shapes == {"x": ((2, 16), "float32")}
    assert spec.subsets == []
    spec = load_spec(
        write_spec(
            tmp_path,
            f"""
subsets = [["m", "n"]]
[[tenants]]
name = "m"
{SMALL_MLP}
[[tenants]]
name = "n"
{SMALL_MLP}
""",
        )
    )
    assert spec.subsets == [("m", "n")]  # `mtcompile build` gives them to compile


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "models").glob("*.toml")), ids=lambda p: p.name
)
def test_example_specs_run_the_default_pipeline_and_show_its_options(path):
    from mtcompile.passes import build_pipeline

    spec = load_spec(path)
    assert spec.tenants
    assert spec.passes == list(DEFAULT_PIPELINE) and spec.pass_options  # options shown
    # the options shown are the defaults: the spec builds what a spec without them does
    shown = [(p.name, p.options()) for p in build_pipeline(spec.passes, spec.pass_options)]
    assert shown == [(p.name, p.options()) for p in build_pipeline(None, None)]


def test_bundled_demo_spec_parses():
    spec = load_spec(Path(__file__).parents[1] / "models" / "heterogeneous.toml")
    assert [t.name for t in spec.tenants] == ["vision", "text", "mlp"]


def test_passes_lists_the_registry(capsys):
    assert main(["passes"]) == 0
    assert "eliminate-dead-nodes (default)" in capsys.readouterr().out


def test_module_entry_point_runs():
    res = subprocess.run(
        [sys.executable, "-m", "mtcompile", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0
    for cmd in ("build", "run", "inspect", "demo"):
        assert cmd in res.stdout
    for code, what in EXIT_CODES.items():  # the exit codes are documented where users look
        assert f"  {code:<4} {what.split(':')[0]}" in res.stdout


@pytest.mark.slow
def test_demo_builds_runs_and_checks_numerics(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "numerics: PASS" in out
    assert out.count(" ok ") == 3  # vision, text, mlp: one output each
    assert (tmp_path / "demo" / "heterogeneous.so").is_file()


def test_cli_error_is_one_clear_line_not_a_traceback(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "mtcompile", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert res.stderr.startswith("mtcompile: error:") and "Traceback" not in res.stderr
    assert "no manifest.json" in res.stderr


# ---------------------------------------------------------------- pipelines (issue 14)
def run_json(capsys, argv: list[str]) -> tuple[int, dict]:
    """Exit code and the one JSON document a command printed on stdout."""
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)  # fails unless stdout is exactly one JSON document


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mtcompile {mtcompile.__version__}"


def test_every_command_prints_one_json_document(built, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 16), np.float32))
    code, doc = run_json(capsys, ["passes"])
    assert code == 0 and doc["default_pipeline"] == list(DEFAULT_PIPELINE)
    code, doc = run_json(capsys, ["inspect", str(built)])
    assert code == 0 and doc["name"] == "small"
    code, doc = run_json(
        capsys,
        [
            "run",
            str(built),
            "--tenant",
            "mlp",
            "--input",
            f"x={tmp_path / 'x.npy'}",
            "-o",
            str(tmp_path / "res"),
        ],
    )
    assert code == 0 and doc["outputs"][0]["shape"] == [2, 8]
    code, doc = run_json(capsys, ["profile", str(built), "--repeat", "1"])
    assert code == 0 and set(doc["tenants"]) == {"mlp", "enc"}
    code, doc = run_json(capsys, ["report", str(built), "-o", str(tmp_path / "r.html")])
    assert code == 0 and doc["bytes"] == (tmp_path / "r.html").stat().st_size
    # an error is a JSON document too, and the one line on stderr
    code, doc = run_json(capsys, ["run", str(built), "--tenant", "nope"])
    assert (code, doc["ok"], doc["exit_code"]) == (1, False, 1)
    assert "unknown tenant 'nope'" in doc["error"]


@pytest.mark.slow  # builds a bundle of its own
def test_build_json_and_a_second_build_from_the_cache(tmp_path, capsys):
    spec = write_spec(tmp_path, f'[[tenants]]\nname = "m"\n{SMALL_MLP}\n')
    cache = ["--cache-dir", str(tmp_path / "cache")]
    code, first = run_json(capsys, ["build", str(spec), "-o", str(tmp_path / "a"), *cache])
    assert code == 0 and first["ok"] and first["verify"]["ok"] is True
    assert first["cache"]["hit"] is False and "build" in first["stages_s"]
    code, again = run_json(capsys, ["build", str(spec), "-o", str(tmp_path / "b"), *cache])
    assert code == 0 and again["cache"] == {"hit": True, "key": first["cache"]["key"]}
    assert "build" not in again["stages_s"]
    assert (again["library_sha256"], again["manifest_sha256"]) == (
        first["library_sha256"],
        first["manifest_sha256"],
    )
    assert (tmp_path / "b" / "spec.so").read_bytes() == (tmp_path / "a" / "spec.so").read_bytes()
    # --no-cache neither reads nor writes it
    code, fresh = run_json(capsys, ["build", str(spec), "-o", str(tmp_path / "c"), "--no-cache"])
    assert code == 0 and fresh["cache"] is None


@pytest.mark.slow  # builds a bundle of its own
def test_exit_codes_for_each_failure_class(built, tmp_path, capsys, monkeypatch):
    spec = write_spec(tmp_path, f'[[tenants]]\nname = "m"\n{SMALL_MLP}\n')
    cache = ["--cache-dir", str(tmp_path / "cache")]
    # usage: argparse's own code, and under --json a JSON document
    with pytest.raises(SystemExit) as e:
        main(["build", "--json"])
    assert e.value.code == 2
    assert json.loads(capsys.readouterr().out)["exit_code"] == 2
    with pytest.raises(SystemExit) as e:
        main(["build", str(spec), "-o", "o", "--atol", "-1"])
    assert e.value.code == 2 and "expected a number >= 0" in capsys.readouterr().err
    # bad input
    assert main(["build", str(tmp_path / "none.toml"), "-o", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.startswith("mtcompile: error: spec file")
    # numerics failure: the bundle is saved all the same
    code, doc = run_json(
        capsys,
        ["build", str(spec), "-o", str(tmp_path / "n"), *cache, "--atol", "0", "--rtol", "0"],
    )
    assert (code, doc["ok"], doc["verify"]["ok"]) == (3, False, False)
    assert (tmp_path / "n" / "manifest.json").is_file()
    # ... and the same build passes with a tolerance relative to the outputs' scale
    code, doc = run_json(
        capsys,
        ["build", str(spec), "-o", str(tmp_path / "n"), *cache, "--atol", "0", "--rtol", "1e-5"],
    )
    assert (code, doc["verify"]["rtol"]) == (0, 1e-5)
    # internal error: one line, no traceback unless -v
    import mtcompile.tools.spec as spec_mod

    monkeypatch.setattr(spec_mod, "load_spec", lambda path: {}["boom"])
    assert main(["build", str(spec), "-o", str(tmp_path / "o")]) == 4
    err = capsys.readouterr().err
    assert err.startswith("mtcompile: internal error: KeyError") and "Traceback" not in err
    assert main(["build", str(spec), "-o", str(tmp_path / "o"), "-v"]) == 4
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.slow  # builds a bundle of its own
def test_build_saves_then_says_it_cannot_verify_without_onnxruntime(tmp_path, capsys, monkeypatch):
    model, _ = encoder_onnx(seed=3, seq=8, d_model=32, heads=2, layers=1, ffn=64)
    onnx.save(model, str(tmp_path / "enc.onnx"))
    spec = write_spec(tmp_path, '[[tenants]]\nname = "enc"\nonnx = "enc.onnx"\n')
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    code = main(
        [
            "build",
            str(spec),
            "-o",
            str(tmp_path / "o"),
            "--json",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    res = capsys.readouterr()
    doc = json.loads(res.out)
    assert code == 0 and doc["verify"]["ok"] is None and "onnxruntime" in doc["verify"]["skipped"]
    assert "mtcompile: warning: numerics not checked" in res.err and "saved" in res.err
    assert (tmp_path / "o" / "spec.so").is_file()


def test_inspect_reads_the_manifest_without_tvm(built):
    code = (
        "import sys; from mtcompile.cli import main; rc = main(['inspect', sys.argv[1]]); "
        "assert 'tvm' not in sys.modules and 'torch' not in sys.modules, 'imported'; "
        "sys.exit(rc)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(built)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "bundle 'small'" in res.stdout and res.stderr == ""


def test_inspect_warns_when_the_library_is_not_the_manifests(built, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(built, tmp_path / "copy")
    lib = copy / "small.so"
    lib.write_bytes(lib.read_bytes() + b"\0")
    assert main(["inspect", str(copy)]) == 0
    assert "does not match the manifest's library_sha256" in capsys.readouterr().err
    lib.unlink()
    assert main(["inspect", str(copy)]) == 0
    assert "is missing" in capsys.readouterr().err


def test_report_without_matplotlib_names_the_extra(built, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    assert main(["report", str(built), "-o", str(tmp_path / "r.html")]) == 1
    assert "pip install 'mtcompile[viz]'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_closed_stdout_stops_quietly_not_as_an_internal_error(built, json_flag):
    # `mtcompile inspect out | head -1`: the reader leaves before the output is written
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtcompile", "inspect", str(built), *json_flag],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and EXIT_CODES[141].startswith("stdout closed")
    assert err == "", err


def test_serve_without_the_serve_extra_says_which(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "mtcompile.serving.server", raising=False)
    monkeypatch.setitem(sys.modules, "mlserver", None)  # not installed
    assert main(["serve", "nowhere"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "`mtcompile serve` needs mlserver" in err and "pip install 'mtcompile[serve]'" in err
