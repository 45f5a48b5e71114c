"""The runtime core and mtcompile-run are built with the package (mtcompile.core.build, run by
setup.py), not by the runtime: a prebuilt file is used while its sources and the versions it
was built against are current; a stale or absent one is compiled once with a one-line notice,
or refused with how to build it where there is no compiler. A process without a compiler
loads and runs a bundle through both front-ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtcompile.core import build

_PROGRAM = "int main() { return 7; }\n"


def _target(tmp_path: Path) -> build.Target:
    """A target of one small program, its prebuilt place under `tmp_path`."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.cc").write_text(_PROGRAM)
    return build.Target(
        "a test program",
        tmp_path / "pkg" / "prog",
        (src,),
        lambda env, rpaths: [str(src / "main.cc")],
        "../..",
    )


def test_a_prebuilt_file_is_used_until_its_sources_or_versions_change(tmp_path):
    t = _target(tmp_path)
    assert "there is no prebuilt prog" in build.stale(t)
    out = build.build_ahead(t, t.file.parent, editable=False)
    assert out == t.file and subprocess.run([str(out)]).returncode == 7
    assert build.stale(t) is None
    assert build.cached(t, tmp_path / "cache") == str(t.file)  # no compiling at run time
    info = json.loads(Path(f"{t.file}.json").read_text())
    assert info["versions"]["apache-tvm-ffi"] == build.versions()["apache-tvm-ffi"]
    info["versions"]["apache-tvm-ffi"] = "0.0.1"
    Path(f"{t.file}.json").write_text(json.dumps(info))
    assert build.stale(t) == (
        f"prog was built against other versions (apache-tvm-ffi 0.0.1 -> "
        f"{build.versions()['apache-tvm-ffi']})"
    )
    (t.source_dirs[0] / "main.cc").write_text(_PROGRAM.replace("7", "8"))
    assert build.stale(t) == "its sources changed since prog was built"


def test_a_stale_file_is_compiled_once_with_a_one_line_notice(tmp_path, capsys):
    t = _target(tmp_path)
    first = build.cached(t, tmp_path / "cache")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("mtcompile: a test program: there is no prebuilt prog")
    assert "compiling it with" in err
    assert subprocess.run([first]).returncode == 7
    assert build.cached(t, tmp_path / "cache") == first
    assert capsys.readouterr().err == ""  # cached: no notice, no compiling


def test_without_a_compiler_a_stale_file_is_refused_with_how_to_build_it(tmp_path, monkeypatch):
    t = _target(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ nor c++ there
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert build.find_compiler() is None
    with pytest.raises(build.BuildError) as e:
        build.cached(t, tmp_path / "cache", "; reinstall it")
    assert str(e.value) == (
        "a test program cannot be loaded: there is no prebuilt prog (mtcompile was not built "
        "by its installer), and no C++ compiler (g++, c++ or $CXX) is here to build it; "
        "reinstall it"
    )
    with pytest.raises(build.BuildError, match="building a test program needs a C"):
        build.build_ahead(t, t.file.parent, editable=False)


def test_a_failing_build_says_what_failed(tmp_path):
    t = _target(tmp_path)
    (t.source_dirs[0] / "main.cc").write_text("int main() { return x; }\n")
    with pytest.raises(
        build.BuildError, match=r"(?s)building a test program failed:.*not declared"
    ):
        build.cached(t, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("prog*/prog"))  # nothing half-built is cached


def test_the_installed_core_and_driver_are_prebuilt_and_current():
    """This install (editable, or a wheel) built both: nothing compiles at run time. After
    editing ``mtcompile/core/src`` or ``run_bundle.cc``, reinstall (``pip install -e .``)."""
    for t in (build.CORE, build.DRIVER):
        assert build.stale(t) is None, f"{t.what}: {build.stale(t)}"
        assert os.access(build.DRIVER.file, os.X_OK)


_NO_COMPILER = """
import sys
import numpy as np
import mtcompile
from mtcompile.core import build
from mtcompile import driver
assert build.find_compiler() is None
b = mtcompile.load(sys.argv[1])
z = np.load(sys.argv[2])
got = b.run_all({t: [z[f"{t}.{i}"] for i in range(len(b.signature(t).inputs))]
                 for t in b.tenant_names})
np.savez(sys.argv[3], **{f"{t}.{i}": a for t, xs in got.items() for i, a in enumerate(xs)})
print(driver.build())
"""


@pytest.mark.slow  # a fresh interpreter loads the bundle
def test_a_host_without_a_compiler_loads_and_runs_a_bundle(tiny_bundle, tiny_saved, tmp_path):
    from mtcompile.runtime.inputs import seeded_inputs

    inputs = {t: seeded_inputs(tiny_bundle.signature(t), 3) for t in tiny_bundle.tenant_names}
    np.savez(
        tmp_path / "in.npz", **{f"{t}.{i}": a for t, xs in inputs.items() for i, a in enumerate(xs)}
    )
    env = dict(os.environ, PATH=str(Path(sys.executable).parent), CXX="/nonexistent")
    env["MTCOMPILE_CACHE_DIR"] = str(tmp_path / "empty-cache")  # no build of earlier runs
    args = [str(tiny_saved), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")]
    res = subprocess.run(
        [sys.executable, "-c", _NO_COMPILER, *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "compiling" not in res.stderr
    got, want = np.load(tmp_path / "out.npz"), tiny_bundle.run_all(inputs)
    for t, xs in want.items():
        for i, a in enumerate(xs):
            np.testing.assert_array_equal(got[f"{t}.{i}"], a, err_msg=f"{t} {i}")
    exe = res.stdout.strip().splitlines()[-1]
    assert exe == str(build.DRIVER.file)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for t in tiny_bundle.tenant_names:
        for io, a in zip(tiny_bundle.manifest.tenants[t].inputs, inputs[t], strict=True):
            np.save(tmp_path / "in" / f"{t}.{io.name}.npy", a)
    run = subprocess.run(
        [exe, str(tiny_saved), "lin", str(tmp_path / "in"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = tiny_bundle.manifest.tenants["lin"].outputs[0]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / out.file), want["lin"][0])
