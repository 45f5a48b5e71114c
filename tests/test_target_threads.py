"""Host CPU target (ymm code, manifest facts, the load check) and TVM's one thread pool
(``threads=``, no spinning, a user's TVM_NUM_THREADS respected)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_tenants, torch_outputs

import mtcompile
from mtcompile.cli import main as cli_main
from mtcompile.errors import ArtifactError, MTCompileError
from mtcompile.runtime import contract
from mtcompile.runtime.abi import MANIFEST
from mtcompile.runtime.manifest import Manifest


class Elementwise(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x * 2.0 + 1.0)


def _elementwise(cpu: str):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    t = mtcompile.Tenant("ew", Elementwise(), example_inputs=(x,))
    return mtcompile.compile([t], passes=[], cpu=cpu), t


def _asm(bundle) -> str:
    """The assembly of the bundle's generated CPU kernels (the llvm module it imports)."""
    (llvm,) = [m for m in bundle.executable.mod.imports if m.kind == "llvm"]
    return llvm.inspect_source("asm")


@pytest.fixture(scope="module")
def host_and_generic():
    return _elementwise("host"), _elementwise("generic")


@pytest.mark.slow  # compiles `host_and_generic`
def test_host_target_emits_ymm_and_generic_does_not(host_and_generic):
    from tvm.target import codegen

    (host, t), (generic, _) = host_and_generic
    flags = _host_flags() or frozenset()
    if "avx" not in flags:
        pytest.skip("this CPU has no AVX: no ymm registers to expect")
    assert "%ymm" in _asm(host)  # the vectorize-by-8 schedule in one 256-bit register
    assert "%ymm" not in _asm(generic) and "%xmm" in _asm(generic)
    assert host.manifest.cpu == str(codegen.llvm_get_system_cpu())
    assert "avx" in host.manifest.cpu_features
    assert generic.manifest.cpu == "generic" and "avx" not in generic.manifest.cpu_features
    assert host.report()["cpu"]["name"] == host.manifest.cpu
    want = torch_outputs(t.model, t.example_inputs)[0]
    for b in (host, generic):  # numerics unchanged by the target
        np.testing.assert_allclose(b.run("ew", *t.example_inputs)[0], want, atol=1e-6)


def test_unknown_cpu_and_cpu_for_cuda_are_refused():
    m = torch.nn.Linear(4, 4)
    t = mtcompile.Tenant("lin", m, example_inputs=(torch.randn(2, 4),))
    with pytest.raises(MTCompileError, match="unknown CPU 'pentium-9000'"):
        mtcompile.compile([t], cpu="pentium-9000")
    with pytest.raises(MTCompileError, match="applies to target llvm only"):
        mtcompile.compile([t], target="cuda", cpu="generic")


def _host_flags() -> frozenset[str] | None:
    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return frozenset(value.split())
    except OSError:
        pass
    return None


def test_missing_features_maps_llvm_names_to_cpuinfo_flags():
    flags = frozenset({"sse", "sse2", "pni", "avx", "bmi1"})
    # x87, fast-lzcnt: tuning, unchecked (the runtime core's table, rule cpu-features)
    assert (
        contract.missing_features(
            ["avx", "+avx2", "sse3", "bmi", "fma", "x87", "fast-lzcnt"], flags
        )
        == "['avx2', 'fma']"
    )
    host = _host_flags()
    assert contract.missing_features(["avx512f"]) == (
        "" if host is None or "avx512f" in host else "['avx512f']"
    )
    assert contract.missing_features(["avx2"], frozenset()) == "['avx2']"


def test_load_refuses_a_cpu_without_the_recorded_features(tiny_saved, tmp_path):
    flags = _host_flags()
    absent = next(
        (
            f
            for f, flag in [
                ("avx512f", "avx512f"),
                ("amx-tile", "amx_tile"),
                ("avx512fp16", "avx512_fp16"),
                ("xop", "xop"),
                ("fma4", "fma4"),
                ("sse4a", "sse4a"),
            ]
            if flags and flag not in flags
        ),
        None,
    )
    if absent is None:
        pytest.skip("no /proc/cpuinfo, or this CPU has every feature tried")
    d = tmp_path / "bundle"
    d.mkdir()
    for f in tiny_saved.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    m = json.loads((d / MANIFEST).read_text())
    assert m["cpu_features"] and m["cpu"]  # written by the build
    m["cpu_features"] = sorted({*m["cpu_features"], absent})
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(
        ArtifactError,
        match=rf"features \['{absent}'\] this machine's CPU "
        "lacks",
    ):
        mtcompile.load(d)


def test_a_manifest_without_cpu_fields_still_reads(tiny_saved):
    d = json.loads((tiny_saved / MANIFEST).read_text())
    d.pop("cpu"), d.pop("cpu_features")  # a mtcompile-bundle/2 file written before them
    m = Manifest.from_dict(d)
    assert m.cpu is None and m.cpu_features is None
    assert contract.missing_features(m.cpu_features or ()) == ""  # nothing recorded


THREADS_CHILD = textwrap.dedent("""
    import json, os, sys, warnings
    import tvm_ffi
    import mtcompile
    from mtcompile.runtime.inputs import seeded_inputs
    mode, d = sys.argv[1], sys.argv[2]
    if mode == "started-small":  # a pool started by someone else with 1 thread
        import tvm  # its runtime library holds the pool
        os.environ["TVM_NUM_THREADS"] = "1"
        tvm_ffi.get_global_func("runtime.NumThreads")()
        del os.environ["TVM_NUM_THREADS"]
    if mode == "shrink":  # a pool started with 2 threads, then a bundle that wants 1
        mtcompile.load(d, threads=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = mtcompile.load(d, threads={"default": None, "shrink": 1}.get(mode, 2))
    b.run_all({t: seeded_inputs(b.signature(t), i) for i, t in enumerate(b.tenant_names)})
    from mtcompile.runtime.threads import pool_size
    print(json.dumps({"threads": b.report()["threads"],
                      "pool": pool_size(), "tvm_pool": tvm_ffi.get_global_func("runtime.NumThreads")(),
                      "env": {k: os.environ.get(k) for k in
                              ("TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")},
                      "warnings": [str(w.message) for w in caught]}))
""")


def _child(mode: str, saved, env_extra: dict[str, str], prefix: tuple = ()) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")
    }
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", THREADS_CHILD, mode, str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, **env_extra},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # fresh interpreters
def test_threads_sets_tvm_pool_and_turns_spinning_off(tiny_saved):
    got = _child("threads", tiny_saved, {})
    assert got["pool"] == 2 and got["env"] == {
        "TVM_NUM_THREADS": "2",
        "TVM_THREAD_POOL_SPIN_COUNT": "0",
    }
    assert got["threads"] == {"requested": 2, "pool": 2, "source": "threads", "spin_count": "0"}
    assert got["warnings"] == []
    cores = len(os.sched_getaffinity(0))
    got = _child("default", tiny_saved, {})  # default: the cores this process may use
    assert got["pool"] == cores and got["threads"]["requested"] == cores


def test_the_default_threads_follow_the_affinity_mask():
    """taskset -c 0 on a machine of more cores: one thread, in Python and in the native
    pool (os.cpu_count() would say all of the machine's cores)."""
    one = sorted(os.sched_getaffinity(0))[:1]
    code = textwrap.dedent(f"""
        import json, os
        os.sched_setaffinity(0, {set(one)!r})
        from mtcompile import native
        from mtcompile.runtime.threads import configure
        print(json.dumps(configure()._asdict() if hasattr(configure(), "_asdict")
                         else vars(configure())))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS",)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["requested"] == 1 and got["pool"] == 1, got


@pytest.mark.parametrize(
    "cpu_max, cores",
    [("50000 100000\n", 1), ("150000 100000\n", 2), ("max 100000\n", None), ("garbage", None)],
)
def test_usable_cores_reads_the_cgroup_quota(tmp_path, cpu_max, cores):
    from mtcompile.runtime.cpu import usable_cores

    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    mask = len(os.sched_getaffinity(0))
    assert usable_cores(str(path)) == (mask if cores is None else min(cores, mask))
    assert usable_cores(str(tmp_path / "missing")) == mask


@pytest.mark.slow  # fresh interpreters
def test_a_user_set_tvm_num_threads_and_spin_count_win(tiny_saved):
    got = _child("threads", tiny_saved, {"TVM_NUM_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "7"})
    assert got["pool"] == 1 and got["env"] == {
        "TVM_NUM_THREADS": "1",
        "TVM_THREAD_POOL_SPIN_COUNT": "7",
    }
    assert got["threads"]["source"] == "TVM_NUM_THREADS"
    assert any("threads=2 ignored: TVM_NUM_THREADS=1" in w for w in got["warnings"])


@pytest.mark.slow  # fresh interpreters
def test_the_native_pool_is_sized_at_will_and_a_larger_one_shrunk(tiny_saved):
    """TVM's own pool cannot grow once started: a bundle with native kernels runs on theirs
    (pool.h), which serves its generated kernels too and takes any size."""
    got = _child("started-small", tiny_saved, {})
    assert got["tvm_pool"] == 1  # started by someone else with 1 thread, and unused
    assert got["pool"] == 2 and got["threads"]["pool"] == 2 and got["warnings"] == []
    got = _child("shrink", tiny_saved, {})
    assert got["pool"] == 1 and got["threads"]["pool"] == 1 and got["warnings"] == []


@pytest.mark.slow  # compiles a bundle of its own
def test_streams_split_the_threads_and_bad_threads_are_refused(tmp_path):
    sources = tiny_tenants()
    b = mtcompile.compile(sources, pass_options={"assign-streams": {"streams": 2, "policy": "max"}})
    assert b.num_streams == 2
    b.run_all({t.name: t.example_inputs for t in sources})
    assert b._executor().threads == max(1, b.threads.pool // 2)
    with pytest.raises(MTCompileError, match="threads must be a positive integer, got 0"):
        mtcompile.load(b.save(tmp_path / "b"), threads=0)


def test_cli_threads_and_cpu_flags(tiny_saved, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli_main(["profile", str(tiny_saved), "--threads", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
    asked, load = [], mtcompile.load
    monkeypatch.setattr(mtcompile, "load", lambda d, **kw: asked.append(kw) or load(d, **kw))
    n = os.cpu_count()  # this process's pool keeps its size for the tests after this one
    assert cli_main(["profile", str(tiny_saved), "--threads", str(n), "--repeat", "1"]) == 0
    assert asked == [{"threads": n, "verify_key": None}]  # no --verify-key given
    assert cli_main(["inspect", str(tiny_saved)]) == 0
    assert "LLVM features; loading needs them" in capsys.readouterr().out


def test_build_and_demo_take_cpu_and_threads():
    from mtcompile.cli import parser

    for cmd in (["build", "spec.toml", "-o", "out"], ["demo"]):
        args = parser().parse_args([*cmd, "--cpu", "generic", "--threads", "3"])
        assert (args.cpu, args.threads) == ("generic", 3)
        assert parser().parse_args(cmd).cpu == "host"


@pytest.mark.slow
def test_demo_set_numerics_hold_on_host_and_generic_targets(hetero_tenants, hetero_bundle):
    generic = mtcompile.compile(hetero_tenants, cpu="generic")
    assert hetero_bundle.manifest.cpu != "generic" and generic.manifest.cpu == "generic"
    inputs = {t.name: t.example_inputs for t in hetero_tenants}
    for b in (hetero_bundle, generic):
        assert b.verify(inputs)["ok"]
    host_out, generic_out = hetero_bundle.run_all(inputs), generic.run_all(inputs)
    for t in hetero_bundle.tenant_names:
        for h, g in zip(host_out[t], generic_out[t], strict=True):
            np.testing.assert_allclose(h, g, atol=1e-4, rtol=1e-4)
