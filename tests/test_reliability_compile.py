"""Issue 13, compile side: no silent wrong answer from a legal pipeline, no out-of-bounds
read, NaN and inf kept as the source framework keeps them, reserved tenant names refused,
pass options checked against each pass's declared schema before any work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from conftest import linear_relu, tiny_tenants, torch_outputs
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import mtcompile
from mtcompile import InputError, MTCompileError, Tenant, TenantError
from mtcompile.analysis.index_ranges import index_reads
from mtcompile.errors import IndexOutOfRangeError
from mtcompile.pass_infra import REGISTRY, AnalysisError, PassOptionError
from mtcompile.passes import build_pipeline
from mtcompile.passes.plan_memory import PlanMemory

MAX = {"assign-streams": {"policy": "max"}}
NOT_A_MODEL = [Tenant("a", model=object())]  # anything that gets past the checks fails


# --------------------------------------------------------------------------- 1: stale plans


def test_a_memory_plan_made_before_the_streams_is_refused_naming_the_passes():
    """Before issue 11 this pipeline built 5 streams over a plan made for one: run_all
    gave a different wrong answer on most calls; ``plan-memory, assign-streams`` died of
    a raw RuntimeError about kernel launch counts."""
    for passes in (
        ["fuse-vertical", "plan-memory", "assign-streams"],
        ["plan-memory", "assign-streams"],
    ):
        with pytest.raises(
            AnalysisError,
            match="pass 'assign-streams' invalidates analysis "
            "'MemoryPlan' computed by 'plan-memory'.*run "
            "'plan-memory' after 'assign-streams'",
        ):
            mtcompile.compile(NOT_A_MODEL, passes=passes, pass_options=MAX)


@pytest.mark.slow
def test_streams_without_a_plan_say_why_instead_of_running_one_stream():
    """Before: ``passes=["assign-streams"]`` with ``max`` built 5 streams and silently ran
    run_all on one."""
    with pytest.raises(
        MTCompileError,
        match=r"assign-streams assigned run_all's kernels to "
        r"5 streams \(policy 'max'\), but no plan-memory "
        r"ran after it.*Run plan-memory after",
    ):
        mtcompile.compile(tiny_tenants(), passes=["assign-streams"], pass_options=MAX)
    one = mtcompile.compile(
        tiny_tenants(), passes=["assign-streams"], pass_options={"assign-streams": {"streams": 1}}
    )
    assert one.num_streams == 1  # what was asked


@pytest.mark.slow
def test_the_legal_stream_pipeline_repeats_bit_for_bit_and_matches_pytorch():
    tenants = tiny_tenants()
    b = mtcompile.compile(
        tenants, passes=["fuse-vertical", "assign-streams", "plan-memory"], pass_options=MAX
    )
    assert b.num_streams > 1
    inputs = {t.name: t.example_inputs for t in tenants}
    first = b.run_all(inputs)
    for t in tenants:
        for got, want in zip(first[t.name], torch_outputs(t.model, t.example_inputs), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for call in range(30):
        again = b.run_all(inputs)
        for t in tenants:
            for x, y in zip(first[t.name], again[t.name], strict=True):
                np.testing.assert_array_equal(x, y, err_msg=f"call {call}, tenant {t.name}")


# --------------------------------------------------------------------------- 2: gathers


class Emb(nn.Module):
    """Embedding(60, 4) at f(i), times 2."""

    def __init__(self, f):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.emb = nn.Embedding(60, 4)
        self.f = f
        self.eval()

    def forward(self, i):
        return self.emb(self.f(i)) * 2.0


class Emb2(nn.Module):
    """An index computed from two inputs."""

    def __init__(self):
        super().__init__()
        self.emb = Emb(lambda i: i)

    def forward(self, i, j):
        return self.emb(i + j)


IDX = torch.tensor([[1, 2, 3]])


def _shift(i):
    return i + 10


def _double(i):
    return i * 2


def _scalar(i):
    return i[0, 1] * 3


def _gathers():
    return [
        Tenant("shift", Emb(_shift), example_inputs=(IDX,)),
        Tenant("dbl", Emb(_double), example_inputs=(IDX,)),
        Tenant("scalar", Emb(_scalar), example_inputs=(IDX,)),
        Tenant("two", Emb2(), example_inputs=(IDX, IDX.clone())),
    ]


@pytest.fixture(scope="module")
def gathers():
    return mtcompile.compile(_gathers())


@pytest.mark.slow  # compiles `gathers`
def test_the_input_range_is_exact_for_a_shifted_index(gathers):
    """Before: ``Embedding(60)(i + 10)`` got index_range [0, 60): i = 55 passed the check
    and read 5 rows past the table; -3 (row 7) was refused."""
    assert gathers.signature("shift").inputs[0].index_range == (-10, 50)
    model = Emb(_shift)
    for v in (-10, -3, 45, 49):
        x = torch.tensor([[1, v, 3]])
        np.testing.assert_array_equal(gathers.run("shift", x)[0], model(x).detach().numpy())
    for v in (-11, 50, 55):
        with pytest.raises(
            InputError,
            match=r"tenant 'shift', input 'i': values index a "
            r"table and must be in \[-10, 50\)",
        ):
            gathers.run("shift", torch.tensor([[1, v, 3]]))


@pytest.mark.parametrize(
    "tenant, where", [("dbl", "input 'i'"), ("scalar", "input 'i'"), ("two", "inputs 'i', 'j'")]
)
@pytest.mark.slow  # compiles `gathers`
def test_a_computed_index_is_checked_in_the_kernel(gathers, tenant, where):
    """Before: ``emb(i * 2)`` had no check at all: 30 returned garbage (row 60), 1e6
    killed the process. Now the generated code refuses it like PyTorch's IndexError."""
    sig = gathers.signature(tenant)
    assert all(s.index_range is None for s in sig.inputs)  # no exact input range
    model = dict((t.name, t.model) for t in _gathers())[tenant]
    ok = [torch.tensor([[1, 2, 19]]) for _ in sig.inputs]
    np.testing.assert_array_equal(gathers.run(tenant, *ok)[0], model(*ok).detach().numpy())
    for v in (30, 45, -3, 10**6):
        bad = [torch.tensor([[1, v, 3]]) for _ in sig.inputs]
        with pytest.raises(IndexError):  # what PyTorch raises
            model(*bad)
        with pytest.raises(
            IndexOutOfRangeError,
            match=rf"^tenant '{tenant}', {where}: index "
            r"out of range: take .* reads a table "
            r"of 60 rows along axis 0, so its "
            r"indices must be in \[0, 60\)$",
        ) as info:
            gathers.run(tenant, *bad)
        assert isinstance(info.value, InputError) and isinstance(info.value, IndexError)
    # run_all checks too, and the bundle still works afterwards
    inputs = {
        t: tuple(torch.tensor([[1, 2, 3]]) for _ in gathers.signature(t).inputs)
        for t in gathers.tenant_names
    }
    with pytest.raises(IndexOutOfRangeError, match=f"tenant '{tenant}'"):
        gathers.run_all({**inputs, tenant: tuple(torch.tensor([[1, 40, 3]]) for _ in sig.inputs)})
    gathers.run_all(inputs)


@pytest.mark.slow  # compiles a bundle of its own
def test_a_check_over_many_indices_compiles_and_keeps_the_gather_vectorized():
    """A check fused with a gather of >= 16 indices was once vectorized by the CPU
    schedule, which LLVM refused (a branch on a vector of conditions)."""
    i = torch.randint(0, 30, (4, 64), generator=torch.Generator().manual_seed(0))
    b = mtcompile.compile([Tenant("dbl", Emb(_double), example_inputs=(i,))])
    np.testing.assert_array_equal(b.run("dbl", i)[0], Emb(_double)(i).detach().numpy())
    with pytest.raises(IndexOutOfRangeError, match="tenant 'dbl', input 'i'"):
        b.run("dbl", i * 3)


@pytest.mark.slow  # compiles `gathers`
def test_only_gathers_the_input_check_leaves_open_get_a_kernel_check(gathers):
    reads = {r.node.split(".")[0]: r for r in index_reads(gathers.graph)}
    assert reads["shift"].source == "shift.i" and reads["shift"].valid == (-10, 50)
    assert reads["dbl"].source is None and reads["dbl"].inputs == ("dbl.i",)
    assert reads["two"].source is None and reads["two"].inputs == ("two.i", "two.j")


@pytest.mark.slow
def test_a_huge_computed_index_raises_instead_of_killing_the_process():
    code = textwrap.dedent("""
        import torch, mtcompile
        from mtcompile import Tenant
        from mtcompile.errors import IndexOutOfRangeError
        from test_reliability_compile import Emb, _double
        b = mtcompile.compile([Tenant("dbl", Emb(_double),
                                      example_inputs=(torch.tensor([[1, 2, 3]]),))])
        try:
            b.run("dbl", torch.tensor([[1, 10**6, 3]]))
        except IndexOutOfRangeError as e:
            print("raised:", e)
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "raised: tenant 'dbl', input 'i': index out of range" in done.stdout


@pytest.mark.slow
def test_gathers_on_streams_raise_the_same_error():
    tenants = [*_gathers(), *tiny_tenants()]
    b = mtcompile.compile(tenants, pass_options=MAX)
    assert b.num_streams > 1
    inputs = {t.name: t.example_inputs for t in tenants}
    b.run_all(inputs)
    with pytest.raises(IndexOutOfRangeError, match="tenant 'dbl', input 'i'"):
        b.run_all({**inputs, "dbl": (torch.tensor([[1, 30, 3]]),)})
    got = b.run_all(inputs)  # fresh streams after the failure
    np.testing.assert_array_equal(got["dbl"][0], Emb(_double)(IDX).detach().numpy())


class GatherScatter(nn.Module):
    """torch.gather and torch.scatter at a computed index (gather_elements and
    scatter_elements: TVM bounds neither)."""

    def forward(self, x, i):
        j = i * 2
        return torch.gather(x, 1, j), torch.scatter(x, 1, j, torch.ones_like(x[:, :2]))


@pytest.mark.slow  # compiles a bundle of its own
def test_gather_and_scatter_elements_are_checked_too():
    """Before: an index past the table read (gather) or wrote (scatter) other memory."""
    x, i = torch.randn(4, 6), torch.tensor([[0, 1], [2, 1], [0, 2], [1, 1]])
    b = mtcompile.compile([Tenant("gs", GatherScatter(), example_inputs=(x, i))])
    assert {b.graph.node(r.node).op for r in index_reads(b.graph)} == {
        "relax.gather_elements",
        "relax.scatter_elements",
    }
    for got, want in zip(b.run("gs", x, i), torch_outputs(GatherScatter(), (x, i)), strict=True):
        np.testing.assert_array_equal(got, want)
    bad = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 1]])
    with pytest.raises(RuntimeError, match="out of bounds"):  # PyTorch refuses it too
        GatherScatter()(x, bad)
    with pytest.raises(
        IndexOutOfRangeError,
        match=r"tenant 'gs', input 'i': index out of "
        r"range: (gather|scatter)_elements .* a "
        r"table of 6 rows along axis 1",
    ):
        b.run("gs", x, bad)


def _gather_onnx() -> onnx.ModelProto:
    w = np.arange(40, dtype=np.float32).reshape(10, 4)
    g = helper.make_graph(
        [helper.make_node("Gather", ["W", "idx"], ["y"], axis=0)],
        "g",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.slow  # compiles a bundle of its own
def test_onnx_gather_keeps_negative_indices_and_its_exact_range():
    b = mtcompile.compile([Tenant("g", _gather_onnx(), input_shapes={"idx": ((3,), "int64")})])
    assert b.signature("g").inputs[0].index_range == (-10, 10)
    assert all(r.source == "g.idx" for r in index_reads(b.graph))  # no kernel check needed
    np.testing.assert_array_equal(b.run("g", np.array([-10, -1, 9]))[0][:, 0], [0, 36, 36])
    with pytest.raises(InputError, match=r"must be in \[-10, 10\)"):
        b.run("g", np.array([0, 10, 2]))


# --------------------------------------------------------------------------- 3: NaN


class NaNOps(nn.Module):
    def forward(self, x):
        return (
            torch.relu(x),
            torch.clamp(x, -1.0, 1.0),
            torch.clamp(x, min=0.0),
            nn.functional.max_pool2d(x, 2),
            nn.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True),
            nn.functional.max_pool1d(x.flatten(2), 3),
            torch.maximum(x, torch.zeros_like(x)),
            torch.minimum(x, x.flip(-1)),
            nn.functional.relu6(x),
            nn.functional.hardtanh(x),
            x.max(),
            x.min(),
        )


def _special(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((1, 2, 5, 5)).astype(np.float32) * 3
    x[0, 0, 0, 0] = np.nan
    x[0, 0, 3, 2] = np.nan
    x[0, 1, 1, 1] = np.inf
    x[0, 1, 2, 4] = -np.inf
    x[0, 1, 4, 0] = np.nan
    return x


@pytest.mark.slow  # compiles a bundle of its own
def test_nan_and_inf_propagate_as_in_pytorch():
    """Before: relu(NaN) = 0, clamp(NaN) = -1 or 1, max-pool skipped NaN, maximum and
    minimum dropped it."""
    x = _special(0)
    b = mtcompile.compile([Tenant("n", NaNOps(), example_inputs=(torch.from_numpy(x),))])
    for seed in range(3):
        x = _special(seed)
        want = torch_outputs(NaNOps(), (torch.from_numpy(x),))
        got = b.run("n", x)
        assert any(np.isnan(w).any() for w in want)
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(g, w, rtol=1e-6, equal_nan=True, err_msg=f"output {k}")


def _nan_onnx() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("MaxPool", ["x"], ["pool"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Max", ["x", "lo"], ["max"]),
        helper.make_node("Min", ["x", "hi"], ["min"]),
        helper.make_node("LeakyRelu", ["x"], ["leaky"], alpha=0.1),
    ]
    outs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
        for n, shape in (
            ("relu", [1, 2, 5, 5]),
            ("pool", [1, 2, 4, 4]),
            ("max", [1, 2, 5, 5]),
            ("min", [1, 2, 5, 5]),
            ("leaky", [1, 2, 5, 5]),
        )
    ]
    inits = [
        numpy_helper.from_array(np.array(-1.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(1.0, np.float32), "hi"),
    ]
    g = helper.make_graph(nodes, "g", [x], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.slow  # compiles a bundle of its own
def test_nan_and_inf_propagate_as_in_onnxruntime():
    """Before: Relu(NaN) = 0, Max/Min and MaxPool dropped NaN."""
    import onnxruntime as ort

    model = _nan_onnx()
    b = mtcompile.compile([Tenant("o", model, input_shapes={"x": ((1, 2, 5, 5), "float32")})])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(3):
        x = _special(seed)
        want = sess.run(None, {"x": x})
        # onnxruntime's MaxPool keeps a NaN only where it comes first in its window; ours
        # keeps it wherever it is, as PyTorch does (and as its finite windows agree)
        pool = nn.functional.max_pool2d(torch.from_numpy(x), 2, 1).numpy()
        finite = ~np.isnan(pool)
        np.testing.assert_array_equal(want[1][finite], pool[finite])
        want[1] = pool
        for k, (g, w) in enumerate(zip(b.run("o", x), want, strict=True)):
            np.testing.assert_allclose(g, w, rtol=1e-6, equal_nan=True, err_msg=f"output {k}")


@pytest.mark.slow  # compiles a bundle of its own
def test_relu_compiles_to_vector_selects():
    class Twice(nn.Module):
        def forward(self, x):
            return torch.relu(x * 2.0)

    b = mtcompile.compile(
        [Tenant("r", Twice(), example_inputs=(torch.randn(64, 256),))], kernels="tvm"
    )
    lib = b.executable.mod
    source = "\n".join(m.inspect_source("ll") for m in [lib, *lib.imports] if m.kind == "llvm")
    assert re.search(r"fcmp olt <\d+ x float>", source)
    assert re.search(r"select <\d+ x i1> .*, <\d+ x float> zeroinitializer, <\d+ x float>", source)


# --------------------------------------------------------------------------- 5: reserved names


@pytest.mark.parametrize(
    "name",
    [
        "run_all__arena",
        "run_all__s0",
        "run_all__s12",
        "run_all_g0",
        "mtcompile_arena",
        "mtcompile_x",
        "run_some__a__b",
    ],
)
def test_names_of_generated_symbols_are_refused_up_front(name):
    """Before: ``run_all__arena`` died in TVM (duplicate global symbol), ``run_all__s0``
    with a KeyError."""
    m, x = linear_relu(0)
    with pytest.raises(
        TenantError,
        match=rf"tenant name '{name}' is reserved: names "
        r"matching 'run_all_\.\*\|run_some_\.\*\|"
        r"mtcompile_\.\*' are "
        r"generated symbols",
    ):
        Tenant(name, m, example_inputs=x)
    Tenant("run_allx", m, example_inputs=x)  # only the pattern


# --------------------------------------------------------------------------- 7: options


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("assign-streams", {"streams": 2.5}, r"option 'streams' must be int \| None, got 2.5"),
        ("assign-streams", {"streams": 1000}, r"streams must be at most 256, got 1000"),
        ("assign-streams", {"min_speedup": float("nan")}, r"min_speedup must be a number"),
        (
            "assign-streams",
            "max",
            r"options of pass 'assign-streams' must be a dict of option "
            r"-> value, got 'max' \(str\)",
        ),
        ("plan-memory", {"alignment": 0}, "alignment must be a power of two, got 0"),
        ("plan-memory", {"alignment": 2**40}, "alignment must be at most 4096, got 1099511627776"),
        ("fuse-horizontal", {"max_group": 0}, "max_group must be at least 2, got 0"),
    ],
)
def test_option_values_are_checked_against_the_schema_before_any_work(name, options, match):
    """Before: alignment=2**40 reached TVM (bad_alloc), max_group=0 a ValueError of range()
    in the middle of the passes."""
    with pytest.raises(PassOptionError, match=match):
        mtcompile.compile(NOT_A_MODEL, pass_options={name: options})


def test_every_pass_declares_its_options_and_instances_are_checked_however_made():
    for name, cls in REGISTRY.items():
        for opt in cls.schema():
            assert opt["doc"], f"pass {name}: option {opt['name']} has no declaration"
    schema = {o["name"]: o for o in REGISTRY["plan-memory"].schema()}
    assert schema["alignment"] == {
        "name": "alignment",
        "type": "int | None",
        "default": None,
        "minimum": 1,
        "maximum": 4096,
        "power_of_two": True,
        "doc": "bytes every offset is a multiple of",
    }
    assert schema["strategy"]["choices"] == ("greedy", "naive")
    with pytest.raises(PassOptionError, match="pass 'plan-memory': alignment must be at most"):
        PlanMemory(alignment=2**40)
    assert build_pipeline(["plan-memory"], {"plan-memory": {"alignment": 128}})[0].alignment == 128


@pytest.mark.slow  # compiles a bundle of its own
def test_the_cuda_build_takes_the_nan_keeping_kernels_and_gathers():
    """The bounds check is llvm-only (a serial loop with an assert does not schedule as a
    device kernel); the NaN-keeping kernels build for cuda too."""
    tenants = [
        Tenant("dbl", Emb(_double), example_inputs=(IDX,)),
        Tenant("n", NaNOps(), example_inputs=(torch.from_numpy(_special(0)),)),
    ]
    b = mtcompile.compile(tenants, target="cuda")
    assert b.target == "cuda" and sorted(b.tenant_names) == ["dbl", "n"]


def test_negative_conv_padding_is_refused_at_import():
    """An ONNX Conv with a negative pad (invalid by the ONNX spec) is refused naming the
    tenant and the op, instead of reaching a kernel at run time (found by the fuzzer)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((2, 1, 3, 3), np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 1, -1])
    graph = helper.make_graph(
        [node],
        "neg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 3])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(mtcompile.TenantError, match=r"tenant 'neg'.*negative padding"):
        mtcompile.compile([mtcompile.Tenant("neg", model)])


# --------------------------------------------------------------------------- found by the fuzzer


class SumPlusOne(nn.Module):
    def forward(self, x):
        return x.sum(dim=1, keepdim=True) + 1.0


@pytest.mark.slow  # compiles a bundle of its own
def test_an_epilogue_after_a_reduction_of_length_one_runs_once():
    """Seed 1, case 36 of the fuzzer: dlight's normalize_prim_func drops unit reduction
    loops, so a 1x1 conv of one input channel, a Linear of one input feature or a sum over
    a dim of size 1 looks spatial; try_inline then puts the bias (or the + 1) into the
    reduction's init and its update: added twice, silently. Now nothing is inlined into a
    block that has an init (`kernels._try_inline`)."""
    torch.manual_seed(0)
    cases = [
        (SumPlusOne(), torch.randn(3, 1, 4), None),  # the default kernels
        (nn.Conv2d(1, 3, 1), torch.randn(2, 1, 5, 6), "tvm"),
        (nn.Linear(1, 4), torch.randn(3, 1), "tvm"),
    ]
    for k, (model, x, kernels) in enumerate(cases):
        model.eval()
        b = mtcompile.compile([Tenant("r", model, example_inputs=(x,))], kernels=kernels)
        np.testing.assert_allclose(
            b.run("r", x)[0],
            torch_outputs(model, (x,))[0],
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"case {k}: {model}",
        )


@pytest.mark.slow  # compiles a bundle of its own
def test_a_float16_mean_and_sum_accumulate_as_pytorch():
    """Seed 1, case 33 of the fuzzer: AdaptiveAvgPool2d(1) over 27 x 28 float16 values was
    0.037 off PyTorch (whose own float16 error is 0.0002). Now float16 sums run in float32
    and are cast back (`kernels.half_sums`), as PyTorch's CPU kernels accumulate."""

    class MeanSum(nn.Module):
        def forward(self, x):
            return nn.functional.adaptive_avg_pool2d(x, 1), x.sum(dim=-1)

    x = (torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.5).half()
    b = mtcompile.compile([Tenant("h", MeanSum(), example_inputs=(x,))])
    for k, (got, want) in enumerate(
        zip(b.run("h", x), torch_outputs(MeanSum(), (x,)), strict=True)
    ):
        assert got.dtype == want.dtype == np.float16
        np.testing.assert_allclose(
            got.astype(np.float32),
            want.astype(np.float32),
            rtol=1e-3,
            atol=1e-3,
            err_msg=f"output {k}",
        )


def hammer(b, inputs, bad, want, threads: int = 8, calls: int = 200) -> dict:
    """`threads` threads x `calls` run_all on `b`; every 5th call of thread 0 gets `bad`
    (which must raise IndexOutOfRangeError). Counts of good calls that failed, wrong outputs
    and refusals (no timing: each thread's calls are a fixed list)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(thread: int) -> tuple[int, int, int]:
        failed = wrong = refused = 0
        for k in range(calls):
            if thread == 0 and k % 5 == 4:
                try:
                    b.run_all(bad)
                except IndexOutOfRangeError:
                    refused += 1
                continue
            try:
                got = b.run_all(inputs)
            except Exception:  # noqa: BLE001  (a good call that failed: counted)
                failed += 1
                continue
            wrong += not all(
                np.array_equal(g, w) for t in want for g, w in zip(got[t], want[t], strict=True)
            )
        return failed, wrong, refused

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, range(threads)))
    return {
        "good_failed": sum(r[0] for r in results),
        "wrong": sum(r[1] for r in results),
        "refused": sum(r[2] for r in results),
        "bad": calls // 5,
    }


def streamed_gathers():
    """A streamed bundle (gathers + the tiny tenants), its inputs, a bad set, its outputs."""
    tenants = [*_gathers(), *tiny_tenants()]
    b = mtcompile.compile(tenants, pass_options=MAX)
    assert b.num_streams > 1
    inputs = {t.name: t.example_inputs for t in tenants}
    return b, inputs, {**inputs, "dbl": (torch.tensor([[1, 30, 3]]),)}, b.run_all(inputs)


@pytest.fixture(scope="module")
def streamed():
    return streamed_gathers()


@pytest.mark.slow  # compiles a bundle of its own; 1,600 calls
def test_a_failing_streamed_run_all_fails_alone_under_concurrent_calls(streamed):
    """8 threads x 200 run_all on a streamed bundle; every 5th call of thread 0 reads out of
    range. Before: the failing call closed the executor the other threads' calls were
    queued on ("cannot schedule new futures after shutdown"). Now: the bad calls raise
    IndexOutOfRangeError, every good call returns the right outputs."""
    got = hammer(*streamed)
    assert got == {"good_failed": 0, "wrong": 0, "refused": 40, "bad": 40}, got


@pytest.mark.slow  # 1,600 calls
def test_a_failing_streamed_run_all_of_a_loaded_bundle_fails_alone(streamed, tmp_path):
    """The same on the bundle saved and loaded (its library's VMs, made by the runtime core's
    stream threads): good calls failed 0, wrong outputs 0; the executor is one, reused after
    every failure (its stream threads run every call)."""
    b, inputs, bad, want = streamed
    loaded = mtcompile.load(b.save(tmp_path / "b"))
    got = hammer(loaded, inputs, bad, want)
    assert got == {"good_failed": 0, "wrong": 0, "refused": 40, "bad": 40}, got
    assert loaded._stream_executor is not None
