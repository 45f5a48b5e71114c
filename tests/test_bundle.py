"""Bundle: run, run_all, report, manifest, and the save/load round trip (also in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import MultiOut, linear_relu, tiny_tenants, torch_outputs

import mtcompile
from mtcompile.errors import MTCompileError
from mtcompile.passes import DEFAULT_PIPELINE
from mtcompile.runtime.abi import MANIFEST
from mtcompile.runtime.artifact import sha256_file
from mtcompile.runtime.manifest import FORMAT, IOSpec, Manifest

ATOL = 1e-5


@pytest.fixture(scope="module")
def sources():
    return {t.name: t for t in tiny_tenants()}


def _inputs(sources, name):
    return sources[name].example_inputs


def test_run_matches_torch_and_returns_numpy_in_order(tiny_bundle, sources):
    assert tiny_bundle.tenant_names == ["lin", "conv", "multi"]
    for name, t in sources.items():
        got = tiny_bundle.run(name, *t.example_inputs)
        want = torch_outputs(t.model, t.example_inputs)
        assert isinstance(got, list) and all(isinstance(g, np.ndarray) for g in got)
        assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)
    # Three outputs come back in the model's order with their own dtypes.
    relu, sums, argmax = tiny_bundle.run("multi", *_inputs(sources, "multi"))
    assert relu.shape == (3, 5) and sums.shape == (3,) and argmax.dtype == np.int64
    assert [o.dtype for o in tiny_bundle.signature("multi").outputs] == [
        "float32",
        "float32",
        "int64",
    ]


def test_run_accepts_numpy_and_torch(tiny_bundle, sources):
    (x,) = _inputs(sources, "conv")
    from_torch = tiny_bundle.run("conv", x)
    from_numpy = tiny_bundle.run("conv", x.numpy())
    np.testing.assert_array_equal(from_torch[0], from_numpy[0])
    # Non-contiguous inputs are fine too.
    xt = torch.randn(8, 2).t()
    assert not xt.is_contiguous()
    np.testing.assert_array_equal(
        tiny_bundle.run("lin", xt)[0], tiny_bundle.run("lin", xt.contiguous().numpy())[0]
    )


class Scale(torch.nn.Module):
    def forward(self, x, s):
        return x * s


@pytest.mark.slow  # compiles a bundle of its own
def test_scalar_inputs():
    # 0-d inputs stay 0-d, from torch or numpy, as example inputs and at run time.
    x, s = np.arange(3, dtype=np.float32), np.array(2.5, np.float32)
    b = mtcompile.compile([mtcompile.Tenant("s", Scale(), example_inputs=(x, s))])
    assert b.signature("s").inputs[1] == IOSpec("s", (), "float32")
    want = [0.0, 2.5, 5.0]
    assert b.run("s", x, s)[0].tolist() == want
    assert b.run("s", torch.from_numpy(x), torch.tensor(2.5))[0].tolist() == want
    assert b.run("s", x, np.float32(2.5))[0].tolist() == want  # a numpy scalar
    assert b.run_all({"s": (x, s)})["s"][0].tolist() == want
    assert b.verify()["ok"]


class ConstOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.arange(3.0))

    def forward(self, x):
        return self.c


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


class Twice(torch.nn.Module):
    def forward(self, x, unused):
        y = x + 1
        return y, y


@pytest.mark.slow  # compiles a bundle of its own
def test_degenerate_tenants():
    # A constant output, an input returned as is, one value returned twice, an unused input.
    x = torch.ones(3)
    b = mtcompile.compile(
        [
            mtcompile.Tenant("const", ConstOut(), example_inputs=(x,)),
            mtcompile.Tenant("ident", Identity(), example_inputs=(x,)),
            mtcompile.Tenant("twice", Twice(), example_inputs=(x, torch.zeros(2))),
        ]
    )
    out = b.run_all({"const": x, "ident": 2 * x, "twice": (x, torch.zeros(2))})
    assert [o.tolist() for o in out["const"]] == [[0.0, 1.0, 2.0]]
    assert [o.tolist() for o in out["ident"]] == [[2.0, 2.0, 2.0]]
    assert [o.tolist() for o in out["twice"]] == [[2.0, 2.0, 2.0]] * 2
    assert [i.name for i in b.signature("twice").inputs] == ["x", "unused"]
    first, second = b.run("twice", x, torch.zeros(2))
    first[0] = 99.0  # outputs are separate arrays
    assert second[0] == 2.0
    assert b.verify()["ok"]


def test_run_from_several_threads(tiny_bundle, sources):
    # One VM per calling thread over the one executable: concurrent calls give the same results.
    from concurrent.futures import ThreadPoolExecutor

    want = {n: tiny_bundle.run(n, *t.example_inputs) for n, t in sources.items()}

    def work(i):
        name = list(sources)[i % len(sources)]
        for _ in range(20):
            got = tiny_bundle.run(name, *sources[name].example_inputs)
            if not all(np.array_equal(a, b) for a, b in zip(got, want[name], strict=True)):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


def test_run_all(tiny_bundle, sources):
    as_torch = {n: t.example_inputs for n, t in sources.items()}
    as_numpy = {n: tuple(x.numpy() for x in t.example_inputs) for n, t in sources.items()}
    # A single input may be given bare instead of in a tuple.
    as_numpy["lin"] = as_numpy["lin"][0]
    out_t, out_n = tiny_bundle.run_all(as_torch), tiny_bundle.run_all(as_numpy)
    assert list(out_t) == ["lin", "conv", "multi"] == list(out_n)
    for name in out_t:
        single = tiny_bundle.run(name, *sources[name].example_inputs)
        assert len(out_t[name]) == len(single)
        for a, b, c in zip(out_t[name], out_n[name], single, strict=True):
            assert isinstance(a, np.ndarray)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


def test_verify_report(tiny_bundle):
    r = tiny_bundle.verify(atol=ATOL)
    assert r["ok"] and r["atol"] == ATOL and list(r["tenants"]) == tiny_bundle.tenant_names
    multi = r["tenants"]["multi"]
    assert multi["run_all_ok"] and len(multi["outputs"]) == 3
    assert all(o["max_abs"] <= ATOL for o in multi["outputs"])
    # Seeded inputs instead of the example inputs give the same verdict.
    inputs = {"lin": (np.ones((2, 8), np.float32),)}
    assert tiny_bundle.verify(inputs, seed=3, atol=ATOL)["ok"]


def test_verify_catches_a_mismatch(tiny_saved, sources):
    # Pair the compiled "lin" with a model of other weights: verify must say so.
    wrong = dict(
        sources,
        lin=mtcompile.Tenant(
            "lin", linear_relu(5)[0], example_inputs=sources["lin"].example_inputs
        ),
    )
    r = mtcompile.load(tiny_saved, sources=wrong).verify(atol=ATOL)
    assert not r["ok"]
    assert not r["tenants"]["lin"]["ok"] and not r["tenants"]["lin"]["run_all_ok"]
    assert r["tenants"]["lin"]["outputs"][0]["max_abs"] > 1e-2
    assert r["tenants"]["conv"]["ok"] and r["tenants"]["multi"]["ok"]
    # A tenant without a source model is reported, not skipped.
    partial = {k: v for k, v in sources.items() if k != "conv"}
    r = mtcompile.load(tiny_saved, sources=partial).verify(atol=ATOL)
    assert not r["ok"] and r["tenants"]["conv"] == {"ok": False, "error": "no source model given"}


def test_report_is_json(tiny_bundle):
    r = tiny_bundle.report()
    assert json.loads(json.dumps(r)) == r
    assert list(r["tenants"]) == ["lin", "conv", "multi"]
    assert r["tenants"]["lin"] == {
        "source": "torch.export",
        "inputs": "x: float32[2, 8]",
        "outputs": "output0: float32[2, 4]",
    }
    assert [p["name"] for p in r["pipeline"]] == DEFAULT_PIPELINE
    assert r["graph"]["nodes"] == len(tiny_bundle.graph)
    assert r["graph"]["nodes_per_tenant"].keys() == {"lin", "conv", "multi"}
    assert set(r["stages_s"]) >= {"import", "merge", "passes", "lower", "build"}
    assert [p["name"] for p in r["passes"]] == DEFAULT_PIPELINE


def test_manifest_json(tiny_bundle, tiny_saved):
    m = json.loads((tiny_saved / MANIFEST).read_text())
    assert m["format"] == FORMAT
    assert set(m["versions"]) >= {"mtcompile", "tvm", "torch", "onnx"}
    assert m["versions"]["mtcompile"] == mtcompile.__version__
    assert m["target"] == "llvm" and m["library"] == "bundle.so"
    assert m["tenant_order"] == ["lin", "conv", "multi"]
    assert m["tenants"]["lin"]["inputs"] == [{"name": "x", "shape": [2, 8], "dtype": "float32"}]
    assert m["tenants"]["conv"]["outputs"] == [
        {"name": "output0", "shape": [1, 5], "dtype": "float32", "file": "conv.output0.npy"}
    ]
    for t in m["tenant_order"]:
        h = m["tenants"][t]["source_sha256"]
        assert len(h) == 64 and int(h, 16) >= 0
        assert m["tenants"][t]["source"] == "torch.export"
    assert m["library_sha256"] == sha256_file(tiny_saved / "bundle.so")
    assert [p["name"] for p in m["pipeline"]] == DEFAULT_PIPELINE
    assert {"name": "eliminate-dead-nodes", "options": {}} in m["pipeline"]
    # The readable copy is the in-memory manifest plus the library's hash; it reads back
    # as the same typed manifest, and the library's embedded copy lacks only what the
    # build found out (memory, the weights table) and the hash.
    assert {k: v for k, v in m.items() if k != "library_sha256"} == tiny_bundle.manifest.to_dict()
    text = (tiny_saved / MANIFEST).read_text()
    assert Manifest.from_json(text) == tiny_bundle.manifest.with_(
        library_sha256=m["library_sha256"]
    )
    assert set(m) - set(tiny_bundle.manifest.embedded()) == {"memory", "weights", "library_sha256"}


def test_signature_and_typed_manifest(tiny_bundle):
    m = tiny_bundle.manifest
    assert isinstance(m, Manifest) and m.format == FORMAT == "mtcompile-bundle/5"
    sig = tiny_bundle.signature("lin")
    assert sig is m.tenants["lin"] and str(sig.inputs[0]) == "x: float32[2, 8]"
    assert m.tenant_order == ("lin", "conv", "multi") and m.library == "bundle.so"
    assert m.streams.num_streams >= 1 and m.memory is not None and m.memory.planned
    assert m.graph.nodes == len(tiny_bundle.graph)


def test_save_load_round_trip_in_process(tiny_bundle, tiny_saved, sources):
    loaded = mtcompile.load(tiny_saved)
    assert loaded.tenant_names == tiny_bundle.tenant_names
    assert loaded.graph is None and loaded.sources == {}
    for name, t in sources.items():
        for a, b in zip(
            loaded.run(name, *t.example_inputs),
            tiny_bundle.run(name, *t.example_inputs),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    ins = {n: t.example_inputs for n, t in sources.items()}
    assert all(
        np.array_equal(a, b)
        for n in ins
        for a, b in zip(loaded.run_all(ins)[n], tiny_bundle.run_all(ins)[n], strict=True)
    )
    assert loaded.report()["tenants"] == tiny_bundle.report()["tenants"]
    # verify needs the sources: an error without them, a verdict with them.
    with pytest.raises(MTCompileError, match="verify needs the source models"):
        loaded.verify()
    assert mtcompile.load(tiny_saved, sources=sources).verify(atol=ATOL)["ok"]


def test_runtime_load_gives_the_lean_bundle(tiny_saved, tiny_bundle, sources):
    # mtcompile.load adds verify and the HTML display; the runtime's own load has neither.
    from mtcompile.runtime.bundle import Bundle
    from mtcompile.runtime.bundle import load as runtime_load

    lean = runtime_load(tiny_saved)
    assert type(lean) is Bundle and not hasattr(lean, "verify")
    assert not hasattr(lean, "_repr_html_") and not hasattr(lean, "graph")
    assert isinstance(mtcompile.load(tiny_saved), mtcompile.Bundle)
    ins = {n: t.example_inputs for n, t in sources.items()}
    got, want = lean.run_all(ins), tiny_bundle.run_all(ins)
    assert all(np.array_equal(a, b) for n in ins for a, b in zip(got[n], want[n], strict=True))
    assert lean.report()["tenants"] == tiny_bundle.report()["tenants"]
    assert "stages_s" in tiny_bundle.report() and "stages_s" not in lean.report()


def test_loaded_bundle_saves_again(tiny_saved, tmp_path, sources):
    loaded = mtcompile.load(tiny_saved)
    loaded.save(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["bundle.so", MANIFEST]
    assert (tmp_path / "copy" / "bundle.so").read_bytes() == (tiny_saved / "bundle.so").read_bytes()
    again = mtcompile.load(tmp_path / "copy")
    (x,) = sources["conv"].example_inputs
    np.testing.assert_array_equal(again.run("conv", x)[0], loaded.run("conv", x)[0])


@pytest.mark.slow  # compiles a bundle of its own
def test_save_overwrites_and_uses_the_bundle_name(tmp_path):
    m = MultiOut()
    x = (torch.randn(3, 5),)
    b = mtcompile.compile([mtcompile.Tenant("m", m, example_inputs=x)], name="my_models")
    out = b.save(tmp_path)
    assert out == tmp_path
    b.save(tmp_path)  # saving twice into the same directory is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "my_models.so"]
    loaded = mtcompile.load(tmp_path)
    assert loaded.manifest.name == "my_models"
    np.testing.assert_array_equal(loaded.run("m", *x)[2], b.run("m", *x)[2])


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import mtcompile
    d, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = mtcompile.load(d)
    inputs = [np.load(f"{d}/../in{i}.npy") for i in range(n)]
    outs = b.run(name, *inputs)
    for i, o in enumerate(outs):
        np.save(f"{d}/../out{i}.npy", o)
    loaded = sorted(m for m in sys.modules if m.startswith("mtcompile"))
    print(json.dumps({"outputs": len(outs), "modules": loaded}))
""")

# What a loaded bundle must not need: model code, the compiler, the tools and their libraries.
NOT_AT_RUN_TIME = (
    "mtcompile.frontend",
    "mtcompile.passes",
    "mtcompile.tools",
    "mtcompile.analysis",
    "mtcompile.backend",
    "onnx",
    "networkx",
    "matplotlib",
)

RUN_ALL_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import mtcompile
    d = sys.argv[1]
    inputs = dict(np.load(f"{d}/../inputs.npz"))
    b = mtcompile.load(d)
    out = b.run_all({t: (inputs[t],) for t in b.tenant_names})
    np.savez(f"{d}/../outputs.npz", **{t: o[0] for t, o in out.items()})
    print(json.dumps(sorted(sys.modules)))
""")


def _imported(modules: list[str], prefixes) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


# two streams compile a bundle of their own
@pytest.mark.parametrize("streams", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_load_and_run_all_in_a_fresh_process_import_no_compiler(
    tiny_bundle, sources, tmp_path, streams
):
    bundle = (
        tiny_bundle
        if streams == 1
        else mtcompile.compile(
            list(sources.values()), pass_options={"assign-streams": {"streams": 2, "policy": "max"}}
        )
    )
    assert bundle.num_streams == streams
    saved = bundle.save(tmp_path / "bundle")
    inputs = {t: s.example_inputs[0].numpy() for t, s in sources.items()}
    np.savez(tmp_path / "inputs.npz", **inputs)
    proc = subprocess.run(
        [sys.executable, "-c", RUN_ALL_CHILD, str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [m for m in modules if m.startswith("mtcompile")]
    print(f"load + run_all ({streams} stream(s)) imports: {ours}")  # quoted in the notes
    assert _imported(modules, NOT_AT_RUN_TIME) == []
    assert "mtcompile.runtime.bundle" in ours and ("mtcompile.runtime.executor" in ours) == (
        streams > 1
    )
    want = bundle.run_all({t: (x,) for t, x in inputs.items()})
    got = np.load(tmp_path / "outputs.npz")
    for t in bundle.tenant_names:
        np.testing.assert_array_equal(got[t], want[t][0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vision", "text", "mlp"])
def test_load_in_a_fresh_process(hetero_bundle, hetero_tenants, tmp_path_factory, name):
    root = tmp_path_factory.mktemp(f"fresh_{name}")
    saved = hetero_bundle.save(root / "bundle")
    tenant = next(t for t in hetero_tenants if t.name == name)
    inputs = [x.numpy() for x in tenant.example_inputs]
    for i, a in enumerate(inputs):
        np.save(root / f"in{i}.npy", a)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(saved), name, str(len(inputs))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    want = hetero_bundle.run(name, *inputs)
    assert info["outputs"] == len(want)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(np.load(root / f"out{i}.npy"), w)
    # A loaded bundle needs no model code, no compiler and no tools.
    assert _imported(info["modules"], NOT_AT_RUN_TIME) == []


@pytest.mark.slow
def test_heterogeneous_bundle_run_all_and_round_trip(hetero_bundle, hetero_tenants, tmp_path):
    inputs = {t.name: t.example_inputs for t in hetero_tenants}
    together = hetero_bundle.run_all(inputs)
    loaded = mtcompile.load(hetero_bundle.save(tmp_path))
    again = loaded.run_all({k: tuple(x.numpy() for x in v) for k, v in inputs.items()})
    for t in hetero_bundle.tenant_names:
        single = hetero_bundle.run(t, *inputs[t])
        for a, b, c in zip(together[t], again[t], single, strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert [m["tenants"][t]["source"] for t in m["tenant_order"]] == [
        "torch.export",
        "onnx",
        "torch.fx",
    ]
    assert m["tenants"]["text"]["inputs"][0]["dtype"] == "int64"
    assert len({m["tenants"][t]["source_sha256"] for t in m["tenant_order"]}) == 3


def test_reload_after_resaving_into_the_same_directory(lin_pair, tmp_path):
    # dlopen returns an already loaded library for the same path: a bundle re-saved into a
    # directory this process has loaded from must still come back as the new code.
    a, b, x = lin_pair
    a.save(tmp_path)
    old = mtcompile.load(tmp_path)
    np.testing.assert_array_equal(old.run("lin", *x)[0], a.run("lin", *x)[0])
    b.save(tmp_path)
    new = mtcompile.load(tmp_path)
    np.testing.assert_array_equal(new.run("lin", *x)[0], b.run("lin", *x)[0])
    np.testing.assert_array_equal(old.run("lin", *x)[0], a.run("lin", *x)[0])  # still a
    assert not np.array_equal(a.run("lin", *x)[0], b.run("lin", *x)[0])
    # The old bundle's library file is gone: saving it now must not pair b's library
    # with a's manifest.
    with pytest.raises(MTCompileError, match="changed since this bundle was loaded from it"):
        old.save(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == []


def test_compare_is_relative_to_the_output_scale():
    """float32 outputs of scale 1e-10: an error of half the scale fails (an absolute 1e-4
    passed it), rounding-sized errors pass, and the near-zero source gets a warning."""
    from mtcompile.tools.verify import compare

    want = np.linspace(-1e-10, 1e-10, 64, dtype=np.float32)
    assert not compare([want * 1.5], [want])["ok"]
    close = compare([want * (1 + 1e-6)], [want])
    assert close["ok"] and close["outputs"][0]["scale"] == pytest.approx(1e-10)
    assert "near zero everywhere" in close["outputs"][0]["warning"]
    ones = np.ones(8, np.float32)
    assert "warning" not in compare([ones], [ones])["outputs"][0]
    assert not compare([ones + 2e-4], [ones])["ok"] and compare([ones + 5e-5], [ones])["ok"]


@pytest.mark.slow
def test_verify_warns_when_a_source_output_is_near_zero_everywhere():
    m, x = linear_relu(0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1e-9)
    b = mtcompile.compile([mtcompile.Tenant("tiny", m, example_inputs=x)])
    with pytest.warns(
        UserWarning,
        match=r"verify: tenant 'tiny', output 0: the source "
        r"model's output is near zero everywhere",
    ):
        r = b.verify()
    assert r["ok"] and "warning" in r["tenants"]["tiny"]["outputs"][0]
