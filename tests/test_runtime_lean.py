"""The lean deployment runtime: a saved bundle loads and runs (run, run_all, run_all on
streams) in a process where importing tvm (the compiler) or torch fails, with the outputs of
the full runtime; what such a process cannot run is said on load; the bundle's resident
footprint is measured on load (`mtcompile.runtime.footprint`)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_tenants

import mtcompile
from mtcompile.errors import ArtifactError, MTCompileError
from mtcompile.runtime import tvmrt
from mtcompile.runtime.vm import ThreadVMs


def block(*packages: str) -> str:
    """Child code that makes importing `packages` (and their submodules) fail: "tvm" blocks
    the compiler package, not tvm_ffi."""
    return textwrap.dedent(f"""
        import importlib.abc, sys
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {packages!r}:
                    raise ImportError(f"{{name}} is blocked in this process")
        sys.meta_path.insert(0, _Block())
    """)


BLOCK = block("tvm", "torch")

RUN_CHILD = BLOCK + textwrap.dedent("""
    import json
    import numpy as np
    import mtcompile
    d, io = sys.argv[1], sys.argv[2]
    b = mtcompile.load(d, threads=2)
    z = np.load(f"{io}/in.npz")
    inputs = {t: [z[f"{t}.{i}"] for i in range(len(b.manifest.tenants[t].inputs))]
              for t in b.tenant_names}
    first, second = b.run_all(inputs), b.run_all(inputs)  # the second reuses the arena
    alone = {t: b.run(t, *inputs[t]) for t in b.tenant_names}
    np.savez(f"{io}/out.npz", **{f"{k}.{t}.{i}": o for k, outs in
                                 (("first", first), ("second", second), ("alone", alone))
                                 for t, os_ in outs.items() for i, o in enumerate(os_)})
    print(json.dumps({"imported": sorted(m for m in sys.modules
                                         if m.split(".")[0] in ("tvm", "torch")),
                      "executor": "mtcompile.runtime.executor" in sys.modules,
                      "footprint": b.report()["footprint"]}))
""")

LOAD_CHILD = BLOCK + textwrap.dedent("""
    import json
    import mtcompile
    try:
        mtcompile.load(sys.argv[1])
        print(json.dumps({"error": None}))
    except mtcompile.MTCompileError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
""")


def _inputs(bundle) -> dict[str, list[np.ndarray]]:
    from mtcompile.runtime.inputs import seeded_inputs

    return {
        t: list(seeded_inputs(bundle.signature(t), i)) for i, t in enumerate(bundle.tenant_names)
    }


def _run_lean(saved, inputs, tmp_path) -> tuple[dict, np.lib.npyio.NpzFile]:
    np.savez(
        tmp_path / "in.npz", **{f"{t}.{i}": a for t, xs in inputs.items() for i, a in enumerate(xs)}
    )
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CHILD, str(saved), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(tmp_path / "out.npz")


def _check_equal(bundle, inputs, got) -> None:
    want = bundle.run_all(inputs)
    for t in bundle.tenant_names:
        for i, w in enumerate(want[t]):
            for k in ("first", "second", "alone"):
                g = got[f"{k}.{t}.{i}"]
                assert g.dtype == w.dtype, (k, t, i)
                np.testing.assert_array_equal(g, w, err_msg=f"{k}: {t} output {i}")


def test_saved_bundle_runs_without_tvm_or_torch(tiny_bundle, tiny_saved, tmp_path):
    """run and run_all in a process where tvm and torch cannot be imported: the outputs of
    the full runtime, neither package imported, and the footprint measured on load."""
    inputs = _inputs(tiny_bundle)
    info, got = _run_lean(tiny_saved, inputs, tmp_path)
    assert info["imported"] == []
    _check_equal(tiny_bundle, inputs, got)
    fp = info["footprint"]
    assert {fp["source"][k] for k in ("runtime", "code")} == {"measured on load"}
    assert fp["source"]["weights"] == "measured on load, plus the mapped weights table"
    assert fp["runtime"] > 1 << 20 and fp["code"] > 0 and "compiler" not in fp
    assert fp["arena"] == tiny_bundle.manifest.memory.arena_bytes
    assert fp["total"] == sum(fp[k] for k in ("runtime", "code", "weights", "arena"))


@pytest.mark.slow
def test_streams_bundle_runs_without_tvm_or_torch(tmp_path):
    """run_all on two streams (the stream executor, its events and hand-overs registered
    without the compiler), twice, in a process where tvm and torch cannot be imported."""
    bundle = mtcompile.compile(
        tiny_tenants(), pass_options={"assign-streams": {"streams": 2, "policy": "max"}}
    )
    assert bundle.num_streams == 2
    saved = bundle.save(tmp_path / "bundle")
    inputs = _inputs(bundle)
    info, got = _run_lean(saved, inputs, tmp_path)
    assert info["imported"] == [] and info["executor"]
    _check_equal(bundle, inputs, got)


@pytest.mark.slow
def test_torch_kernels_bundle_says_it_needs_torch(tmp_path):
    """A bundle built with kernels="torch", loaded where torch cannot be imported: an error
    on load that names the provider, the op kinds and the ways out."""
    saved = mtcompile.compile(tiny_tenants()[:1], kernels="torch").save(tmp_path / "b")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_CHILD, str(saved)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["error"] == "MTCompileError", info
    msg = info["message"]
    assert "kernel provider 'torch'" in msg and "matmul" in msg, msg
    assert "install torch" in msg and "kernels='native'" in msg, msg


def test_compile_in_a_serving_install_names_the_extra():
    """Without torch (a serving install), mtcompile.compile says which extra compiles."""
    code = block("torch") + textwrap.dedent("""
        import mtcompile
        try:
            mtcompile.compile
        except mtcompile.MTCompileError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install 'mtcompile[compile]'" in proc.stdout and "torch" in proc.stdout


def test_missing_function_is_loaded_or_named(monkeypatch):
    """A VM that cannot find a function: TVM's other libraries are loaded and the VM made
    again; a function none of them has is named in an ArtifactError."""
    made = []

    def make_vm(executable, dev):
        made.append(dev)
        if len(made) == 1:  # TVM's contrib sort lives in libtvm_runtime_extra.so
            raise RuntimeError(
                "Check failed: (func.has_value()) is false: Error: Cannot find "
                "ffi::Function tvm.contrib.sort.argsort in either Relax VM ..."
            )
        if executable == "nowhere":
            raise RuntimeError("Cannot find ffi::Function mtcompile.test.nowhere in either ...")
        return "vm"

    monkeypatch.setattr(tvmrt, "make_vm", make_vm)
    assert ThreadVMs("exe", "llvm").new_vm() == "vm" and len(made) == 2
    with pytest.raises(
        ArtifactError,
        match=r"calls 'mtcompile\.test\.nowhere', which this "
        r"process cannot provide: neither",
    ):
        ThreadVMs("nowhere", "llvm").new_vm()
    with (
        monkeypatch.context() as m,
        pytest.raises(
            ArtifactError,
            match=r"'mtcompile\.test\.nowhere', which this process cannot "
            r"provide: importing tvm \(the compiler",
        ),
    ):
        m.setitem(sys.modules, "tvm", None)  # import tvm fails, as where tvm is blocked
        ThreadVMs("nowhere", "llvm").new_vm()
    with pytest.raises(MTCompileError):  # any other error passes through unchanged
        monkeypatch.setattr(
            tvmrt, "make_vm", lambda e, d: (_ for _ in ()).throw(MTCompileError("other"))
        )
        ThreadVMs("exe", "llvm").new_vm()


class _Wide(torch.nn.Module):
    """Two seeded dense layers, d -> hidden -> d: (512, 1024) holds 4 MiB of weights, enough
    to see them in the resident set; (2048, 2048) 32 MiB, where a copy on load would show."""

    def __init__(self, d: int = 512, hidden: int = 1024):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)
        self.eval()

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


FOOTPRINT_CHILD = textwrap.dedent("""
    import json, sys
    import mtcompile
    print(json.dumps(mtcompile.load(sys.argv[1]).footprint()))
""")


@pytest.mark.slow
def test_footprint_measures_the_weights_once(tmp_path, capsys):
    """Measured on load in a fresh process: the weights' resident bytes are the manifest's
    (unpacked once), and the library's read-only pages that carried them are handed back;
    `mtcompile inspect` prints the parts computed from the manifest and file sizes."""
    from mtcompile.cli import main

    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    saved = mtcompile.compile([mtcompile.Tenant("wide", _Wide(), example_inputs=(x,))]).save(
        tmp_path / "b"
    )
    manifest = mtcompile.load(saved).manifest
    weights = manifest.memory.weight_bytes
    assert weights > 4 << 20
    proc = subprocess.run(
        [sys.executable, "-c", FOOTPRINT_CHILD, str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.95 * weights <= fp["weights"] <= 1.25 * weights, (fp, weights)
    assert fp["code"] < (saved / manifest.library).stat().st_size - 0.8 * weights, fp
    assert main(["inspect", str(saved)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("resident (computed) runtime <= ") and "weights 4.0 MiB" in line


def test_a_compile_command_in_a_serving_install_names_the_extra(tmp_path):
    """`mtcompile demo` where torch and onnx are not installed: the clear error and exit 1
    (bad input), not an internal error."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class _Absent(importlib.abc.MetaPathFinder):  # as an install without them
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "onnx"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, _Absent())
        from mtcompile.cli import main
        sys.exit(main(["demo", "-o", sys.argv[1]]))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "pip install 'mtcompile[compile]'" in proc.stderr
    assert "internal error" not in proc.stderr


PEAK_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mtcompile import native
    from mtcompile.runtime import tvmrt
    from mtcompile.runtime.inputs import seeded_inputs
    def hwm():
        return int(next(l for l in open("/proc/self/status")
                        if l.startswith("VmHWM:")).split()[1]) * 1024
    tvmrt.ffi(torch=False)
    native.preload()
    import mtcompile
    before = hwm()
    b = mtcompile.load(sys.argv[1])
    loaded = hwm()
    if sys.argv[3] == "prepare":
        b.prepare("big")
    prepared = hwm()
    out = b.run("big", *seeded_inputs(b.signature("big"), 0))
    np.save(sys.argv[2], out[0])
    print(json.dumps({"load": loaded - before, "prepare": prepared - loaded,
                      "run": hwm() - prepared}))
""")


@pytest.mark.slow
def test_load_maps_the_weights_without_copies(tmp_path):
    """The weights are linked into the library as one table and mapped where it lies: the
    executable holds none of them, loading copies none (TVM's own constants were copied three
    times over: the peak grew by ~4x their size), a run touches them once; the outputs match
    the compiled bundle's."""
    x = torch.randn(2, 2048, generator=torch.Generator().manual_seed(0))
    bundle = mtcompile.compile([mtcompile.Tenant("big", _Wide(2048, 2048), example_inputs=(x,))])
    table = bundle.manifest.weights
    assert table is not None and table.bytes >= 32 << 20
    assert set(table.args) >= {"big", "run_all"} and len(table.args["big"]) >= 2
    saved = bundle.save(tmp_path / "b")
    assert (saved / "bundle.so").stat().st_size > table.bytes  # carried by the library
    grew = {}
    for mode in ("run", "prepare"):
        proc = subprocess.run(
            [sys.executable, "-c", PEAK_CHILD, str(saved), str(tmp_path / "o.npy"), mode],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        grew[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert grew["run"]["load"] < 0.25 * table.bytes, grew
    assert grew["run"]["run"] < 1.5 * table.bytes, grew
    # prepare() faults the weights in: the first run then finds them resident
    assert grew["prepare"]["prepare"] > 0.9 * table.bytes, grew
    assert grew["prepare"]["run"] < 0.25 * table.bytes, grew
    from mtcompile.runtime.inputs import seeded_inputs

    want = bundle.run("big", *seeded_inputs(bundle.signature("big"), 0))[0]
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), want)
