"""Every bad input gets a clear mtcompile error (never a crash) that names what, where, and why."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
import tvm
from conftest import LinearReLU, linear_relu, seeded_input
from onnx import TensorProto, helper
from tvm import relax

import mtcompile
from mtcompile import (
    ArtifactError,
    InputError,
    MTCompileError,
    Tenant,
    TenantError,
    UnsupportedOperatorError,
)
from mtcompile.runtime import artifact
from mtcompile.runtime.abi import MANIFEST
from mtcompile.runtime.manifest import FORMAT

# --------------------------------------------------------------------------- helpers


def _onnx(nodes, inputs, outputs, domains=(), initializers=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=opsets)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _compile_error(*tenants, error=TenantError, **kwargs) -> str:
    with pytest.raises(error) as info:
        mtcompile.compile(list(tenants), **kwargs)
    return str(info.value)


class Gamma(torch.nn.Module):
    """lgamma and i0: real torch ops with no TVM converter."""

    def forward(self, x):
        return torch.special.i0(torch.lgamma(x) + 1) * 2


class Frac(torch.nn.Module):
    def forward(self, x):
        return x.frac()


class Unshuffle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shuffle = torch.nn.PixelUnshuffle(2)

    def forward(self, x):
        return self.shuffle(x)


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


# --------------------------------------------------------------------------- unsupported operators


def test_unsupported_operator_torch_export():
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = ExportedProgramImporter().convert_map
    assert "lgamma.default" not in known and "i0.default" not in known
    with pytest.raises(UnsupportedOperatorError) as info:
        mtcompile.compile([Tenant("gamma", Gamma(), example_inputs=(torch.rand(2, 3) + 0.5,))])
    e = info.value
    assert e.tenant == "gamma" and e.frontend == "torch.export"
    # checked after the decomposition to core ATen the importer runs: special_i0 is i0 there
    assert [op for op, _ in e.ops] == ["lgamma.default", "i0.default"]
    msg = str(e)
    assert msg.startswith(
        "tenant 'gamma': 2 operator(s) not supported by TVM's torch.export importer:"
    )
    # Each op points at the user's source line.
    assert re.search(
        r"- lgamma\.default \(from File \".*test_errors\.py\", line \d+, in forward\)", msg
    ), msg
    assert isinstance(e, TenantError)


def test_unsupported_operator_torch_fx():
    x = (torch.rand(2, 3) + 0.5,)
    msg = _compile_error(
        Tenant("gammafx", torch.fx.symbolic_trace(Gamma()), example_inputs=x),
        error=UnsupportedOperatorError,
    )
    assert "tenant 'gammafx': 2 operator(s) not supported by TVM's torch.fx importer" in msg
    assert "- lgamma (from fx node lgamma)" in msg and "- special_i0 (" in msg
    msg = _compile_error(
        Tenant("method", torch.fx.symbolic_trace(Frac()), example_inputs=x),
        error=UnsupportedOperatorError,
    )
    assert "- Tensor.frac (from fx node frac)" in msg
    msg = _compile_error(
        Tenant(
            "sub",
            torch.fx.symbolic_trace(Unshuffle()),
            input_shapes={"x": ((1, 1, 4, 4), "float32")},
        ),
        error=UnsupportedOperatorError,
    )
    assert "- PixelUnshuffle (from submodule 'shuffle')" in msg


def test_unsupported_operator_onnx_custom_op():
    model = _onnx(
        [helper.make_node("MyCustomOp", ["X"], ["Y"], domain="com.example", name="custom0")],
        [_vi("X", [2, 3])],
        [_vi("Y", [2, 3])],
        domains=["com.example"],
    )
    msg = _compile_error(Tenant("cust", model), error=UnsupportedOperatorError)
    assert msg == (
        "tenant 'cust': 1 operator(s) not supported by TVM's ONNX importer:\n"
        "  - com.example.MyCustomOp (from node 'custom0')"
    )


def test_onnx_custom_domain_op_named_like_a_standard_op_is_not_imported_as_it():
    # TVM's importer would take com.example.Relu for Relu and compile the wrong thing.
    model = _onnx(
        [helper.make_node("Relu", ["X"], ["Y"], domain="com.example", name="r")],
        [_vi("X", [2, 3])],
        [_vi("Y", [2, 3])],
        domains=["com.example"],
    )
    msg = _compile_error(Tenant("cust", model), error=UnsupportedOperatorError)
    assert "- com.example.Relu (from node 'r')" in msg


def test_unsupported_standard_onnx_op_without_node_name():
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    assert "StringNormalizer" not in _get_convert_map()
    model = _onnx(
        [helper.make_node("StringNormalizer", ["X"], ["Y"])],
        [_vi("X", [2], TensorProto.STRING)],
        [_vi("Y", [2], TensorProto.STRING)],
    )
    msg = _compile_error(Tenant("strings", model), error=UnsupportedOperatorError)
    assert "- StringNormalizer (from node #0)" in msg


# --------------------------------------------------------------------------- tenants


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a.b", "a b", "_x", "naïve", "abc\n", None, 3])
def test_invalid_tenant_name(name):
    with pytest.raises(TenantError) as info:
        Tenant(name, LinearReLU())
    assert (
        f"tenant name {name!r} is not valid: expected a letter followed by letters, digits "
        "or '_'" in str(info.value)
    )


@pytest.mark.parametrize("name", ["run_all", "main", "mtcompile_manifest"])
def test_reserved_tenant_name(name):
    with pytest.raises(TenantError, match=f"tenant name '{name}' is reserved; choose another"):
        Tenant(name, LinearReLU())


def test_duplicate_tenant_names():
    m, x = linear_relu()
    msg = _compile_error(
        Tenant("a", m, example_inputs=x),
        Tenant("b", m, example_inputs=x),
        Tenant("b", m, example_inputs=x),
        Tenant("a", m, example_inputs=x),
    )
    assert msg == "duplicate tenant name(s) ['a', 'b']: every tenant needs its own name"


def test_module_without_example_inputs():
    msg = _compile_error(Tenant("noinputs", LinearReLU(), input_shapes={"x": ((2, 8), "float32")}))
    assert msg == (
        "tenant 'noinputs': a torch.nn.Module needs example_inputs (a tuple of "
        "tensors) to be traced with torch.export"
    )


def test_fx_without_shapes():
    gm = torch.fx.symbolic_trace(LinearReLU())
    msg = _compile_error(Tenant("noshapes", gm))
    assert msg == (
        "tenant 'noshapes': a torch.fx.GraphModule needs input_shapes ({name: "
        "(shape, dtype)} for inputs ['x']) or example_inputs"
    )


def test_fx_shapes_that_do_not_match():
    gm = torch.fx.symbolic_trace(LinearReLU())
    msg = _compile_error(Tenant("fx", gm, input_shapes={"input": ((2, 8), "float32")}))
    assert msg == (
        "tenant 'fx': input_shapes names ['input'] do not match the GraphModule's inputs ['x']"
    )
    msg = _compile_error(Tenant("fx", gm, example_inputs=(torch.rand(2, 8), torch.rand(2, 8))))
    assert msg == "tenant 'fx': 2 example inputs for a GraphModule with inputs ['x']"


def test_torch_export_failure():
    msg = _compile_error(Tenant("dyn", DataDependent(), example_inputs=(torch.rand(2, 3),)))
    assert msg.startswith("tenant 'dyn': torch.export failed: ")
    assert "\n" not in msg  # one line, not torch's page of advice


def test_unsupported_model_type():
    msg = _compile_error(Tenant("weird", {"not": "a model"}))
    assert msg == (
        "tenant 'weird': model of type dict is not supported; expected "
        "torch.nn.Module, torch.fx.GraphModule, torch.export.ExportedProgram, "
        "onnx.ModelProto or a path to an .onnx file"
    )


def test_compile_arguments():
    m, x = linear_relu()
    assert _compile_error() == "compile needs at least one tenant"
    assert _compile_error(m) == "expected mtcompile.Tenant objects, got LinearReLU"
    msg = _compile_error(Tenant("a", m, example_inputs=x), target="vulkan", error=MTCompileError)
    assert msg == "unknown target 'vulkan'; expected one of ['llvm', 'cuda']"


# --------------------------------------------------------------------------- ONNX files


def test_unreadable_onnx_file(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\x01 this is not protobuf \xff" * 20)
    msg = _compile_error(Tenant("garbage", path))
    assert msg.startswith(f"tenant 'garbage': {str(path)!r} is not a readable ONNX file: ")


def test_missing_onnx_file(tmp_path):
    path = tmp_path / "nope.onnx"
    assert _compile_error(Tenant("missing", path)) == (
        f"tenant 'missing': ONNX file {str(path)!r} does not exist"
    )
    assert _compile_error(Tenant("missing", str(tmp_path))) == (  # a directory is not a file
        f"tenant 'missing': ONNX file {str(tmp_path)!r} does not exist"
    )


def test_invalid_onnx_model(tmp_path):
    # Relu reads "Z", which nothing defines: the checker refuses it, naming the node.
    model = _onnx(
        [helper.make_node("Relu", ["Z"], ["Y"], name="r0")], [_vi("X", [2, 3])], [_vi("Y", [2, 3])]
    )
    msg = _compile_error(Tenant("broken", model))
    assert msg.startswith("tenant 'broken': invalid ONNX model: ")
    assert "'Z'" in msg and "Relu" in msg and "\n" not in msg
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    assert _compile_error(Tenant("broken", path)) == msg
    empty = _onnx([], [], [])
    assert _compile_error(Tenant("empty", empty)) == "tenant 'empty': the ONNX graph has no nodes"


@pytest.mark.slow  # compiles a library of its own
def test_onnx_symbolic_dim_needs_input_shapes():
    model = _onnx(
        [helper.make_node("Relu", ["X"], ["Y"])],
        [_vi("X", [2, "seq", 3])],
        [_vi("Y", [2, "seq", 3])],
    )
    msg = _compile_error(Tenant("sym", model))
    assert msg == (
        "tenant 'sym': input 'X' axis 1: symbolic dim 'seq' has no bounds; give "
        "dim_bounds={'seq': (lo, hi)} (or a fixed size in input_shapes)"
    )
    msg = _compile_error(
        Tenant("sym", model, input_shapes={"X": ((2, 4, 3), "float32"), "Q": ((1,), "float32")})
    )
    assert msg == (
        "tenant 'sym': input_shapes names ['Q'] that are not inputs of the ONNX "
        "model (inputs: ['X'])"
    )
    # With the shape given it compiles.
    b = mtcompile.compile([Tenant("sym", model, input_shapes={"X": ((2, 4, 3), "float32")})])
    x = -np.ones((2, 4, 3), np.float32)
    np.testing.assert_array_equal(b.run("sym", x)[0], np.zeros_like(x))


# --------------------------------------------------------------------------- run time


def test_run_unknown_tenant(tiny_bundle):
    with pytest.raises(InputError) as info:
        tiny_bundle.run("nope", np.zeros((2, 8), np.float32))
    assert str(info.value) == "unknown tenant 'nope'; this bundle has ['lin', 'conv', 'multi']"


def test_run_wrong_number_of_inputs(tiny_bundle):
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(InputError) as info:
        tiny_bundle.run("lin", x, x)
    assert str(info.value) == "tenant 'lin' takes 1 input(s) (x: float32[2, 8]), got 2"
    with pytest.raises(InputError, match=r"tenant 'lin' takes 1 input\(s\) .*, got 0"):
        tiny_bundle.run("lin")


def test_run_wrong_shape(tiny_bundle):
    with pytest.raises(InputError) as info:
        tiny_bundle.run("conv", torch.zeros(1, 3, 9, 8))
    assert str(info.value) == (
        "tenant 'conv', input 'x': expected float32[1, 3, 8, 8], got "
        "float32[1, 3, 9, 8] (signature: x: float32[1, 3, 8, 8])"
    )


def test_run_wrong_dtype(tiny_bundle):
    with pytest.raises(InputError) as info:
        tiny_bundle.run("lin", np.zeros((2, 8)))  # float64
    assert str(info.value) == (
        "tenant 'lin', input 'x': expected float32[2, 8], got "
        "float64[2, 8] (signature: x: float32[2, 8])"
    )
    with pytest.raises(InputError, match="expected float32\\[3, 5\\], got int64\\[3, 5\\]"):
        tiny_bundle.run("multi", torch.zeros(3, 5, dtype=torch.int64))


def test_run_input_that_is_not_an_array(tiny_bundle):
    with pytest.raises(InputError) as info:
        tiny_bundle.run("lin", torch.zeros(2, 8, dtype=torch.float8_e4m3fn))  # no numpy dtype
    assert str(info.value).startswith("tenant 'lin', input 'x': cannot use a Tensor as an array (")
    assert str(info.value).endswith("); expected float32[2, 8]")
    with pytest.raises(InputError, match="tenant 'lin', input 'x': cannot use a list as an array"):
        tiny_bundle.run("lin", [[1.0, 2.0], [3.0]])
    with pytest.raises(InputError, match=r"expected float32\[2, 8\], got <U3\[\] \(signature"):
        tiny_bundle.run("lin", "abc")  # a 0-d string array, reported as it is


@pytest.mark.slow  # compiles a library of its own
def test_run_out_of_range_index():
    emb = torch.nn.Embedding(10, 4).eval()
    b = mtcompile.compile([Tenant("emb", emb, example_inputs=(torch.tensor([[1, 2, 3]]),))])
    assert b.signature("emb").inputs[0].index_range == (0, 10)
    with pytest.raises(InputError) as info:
        b.run("emb", np.array([[1, 10, 3]]))
    assert str(info.value) == (
        "tenant 'emb', input 'input': values index a table of 10 rows "
        "and must be in [0, 10); got values in [1, 10]"
    )
    np.testing.assert_array_equal(
        b.run("emb", np.array([[0, 9, 3]]))[0][0, 1], emb.weight[9].detach().numpy()
    )


@pytest.mark.slow  # compiles a library of its own
def test_onnx_gather_accepts_negative_indices_and_checks_the_range():
    import onnx
    from onnx import TensorProto, helper

    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 2])],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    b = mtcompile.compile([Tenant("g", model)])
    assert b.signature("g").inputs[0].index_range == (-6, 6)
    np.testing.assert_array_equal(b.run("g", np.array([0, -1, 5]))[0], table[[0, -1, 5]])
    with pytest.raises(InputError, match=r"must be in \[-6, 6\); got values in \[-7, 0\]"):
        b.run("g", np.array([0, -7, 0]))


def test_run_all_missing_and_unknown_tenants(tiny_bundle):
    x = (np.zeros((2, 8), np.float32),)
    with pytest.raises(InputError) as info:
        tiny_bundle.run_all({"lin": x, "zz": x})
    assert str(info.value) == (
        "run_all needs inputs for exactly the tenants ['lin', 'conv', "
        "'multi']; missing ['conv', 'multi'], unknown ['zz']"
    )
    with pytest.raises(InputError, match=r"missing \['lin', 'conv', 'multi'\], unknown \[\]"):
        tiny_bundle.run_all({})
    with pytest.raises(InputError, match=r"run_all takes a dict \{tenant name: tuple of inputs\}"):
        tiny_bundle.run_all([x])


def test_run_all_names_the_tenant_with_a_bad_input(tiny_bundle):
    good = {
        "lin": (np.zeros((2, 8), np.float32),),
        "conv": (np.zeros((1, 3, 8, 8), np.float32),),
        "multi": (np.zeros((3, 5), np.float32),),
    }
    with pytest.raises(InputError, match=r"tenant 'multi', input 'x': expected float32\[3, 5\]"):
        tiny_bundle.run_all(dict(good, multi=(np.zeros((5, 3), np.float32),)))
    # After all these errors the bundle still runs: nothing reached the executable.
    out = tiny_bundle.run_all(good)
    assert [len(out[t]) for t in out] == [1, 1, 3]


# --------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def other_saved(lin_pair, tmp_path_factory):
    """A second one-tenant bundle (different weights), saved under the same file names."""
    return lin_pair[0].save(tmp_path_factory.mktemp("other"))


@pytest.fixture
def saved(tiny_saved, tmp_path):
    """A private copy of the saved tiny bundle that a test may damage."""
    return shutil.copytree(tiny_saved, tmp_path / "bundle")


def _manifest(d):
    return json.loads((d / MANIFEST).read_text())


def _write_manifest(d, m):
    (d / MANIFEST).write_text(json.dumps(m))


def test_load_works_on_the_undamaged_copy(saved):
    assert mtcompile.load(saved).tenant_names == ["lin", "conv", "multi"]


def test_load_missing_directory_or_manifest(tmp_path, saved):
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(tmp_path / "nowhere")
    assert str(info.value) == (
        f"{tmp_path / 'nowhere'}: no manifest.json; is this a directory written by Bundle.save?"
    )
    (saved / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="no manifest.json; is this a directory written"):
        mtcompile.load(saved)


def test_load_missing_library(saved):
    (saved / "bundle.so").unlink()
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    assert str(info.value) == f"{saved}: the manifest names library 'bundle.so', which is missing"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "is corrupt: not valid JSON (Expecting property name"),
        ("", "is corrupt: not valid JSON (Expecting value"),
        ("[1, 2]", "is corrupt: expected a JSON object, found list"),
        ('"bundle"', "is corrupt: expected a JSON object, found str"),
        ("null", "is corrupt: expected a JSON object, found NoneType"),
    ],
)
def test_load_invalid_manifest_json(saved, text, expected):
    (saved / MANIFEST).write_text(text)
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    assert str(info.value).startswith(f"{saved / MANIFEST} {expected}")


def _delete(m: dict, path: tuple):
    for k in path[:-1]:
        m = m[k]
    del m[path[-1]]


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (("library",), "library"),
        (("library_sha256",), "library_sha256"),
        (("tenants",), "tenants"),
        (("tenant_order",), "tenant_order"),
        (("target",), "target"),
        (("versions", "tvm"), "versions.tvm"),
        (("run_all_inputs",), "run_all_inputs"),
        (("streams", "num_streams"), "streams.num_streams"),
        (("graph", "nodes"), "graph.nodes"),
        (("tenants", "conv", "inputs", 0, "dtype"), "tenants.conv.inputs[0].dtype"),
        (("memory", "arena_bytes"), "memory.arena_bytes"),
    ],
)
def test_load_manifest_missing_key(saved, path, key):
    m = _manifest(saved)
    _delete(m, path)
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    if key in ("streams.num_streams", "graph.nodes"):
        # fields the runtime core does not read: its embedded-manifest rule names them first,
        # as mtcompile-run does (one first line for both front-ends)
        top = key.split(".")[0]
        assert str(info.value) == (
            f"{saved / 'bundle.so'} and {saved / MANIFEST} disagree on ['{top}']"
        )
        return
    assert str(info.value) == f"{saved / MANIFEST} is corrupt: key '{key}': missing"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "expected str, found NoneType None"),
        (3, "expected str, found int 3"),
        (["bundle.so"], "expected str, found list ['bundle.so']"),
        ("", "'' is not a file name"),
        ("../bundle.so", "'../bundle.so' is not a file name"),
    ],
)
def test_load_manifest_bad_library_name(saved, value, why):
    m = _manifest(saved)
    m["library"] = value
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    assert str(info.value) == f"{saved / MANIFEST} is corrupt: key 'library': {why}"


@pytest.mark.parametrize(
    ("value", "found"), [(None, "NoneType None"), (12, "int 12"), (["ab"], "list ['ab']")]
)
def test_load_manifest_bad_library_hash(saved, value, found):
    m = _manifest(saved)
    m["library_sha256"] = value
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    assert str(info.value) == (
        f"{saved / MANIFEST} is corrupt: key 'library_sha256': expected str, found {found}"
    )


def test_load_manifest_wrong_kinds_name_the_key(saved):
    m = _manifest(saved)
    m["tenants"]["lin"]["inputs"][0]["shape"] = [2, "8"]
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    # the core reads '8' as a dim's name; the embedded manifest names the edit first, as
    # mtcompile-run does
    assert str(info.value) == (
        f"{saved / 'bundle.so'} and {saved / MANIFEST} disagree on ['tenants']"
    )
    m["tenants"]["lin"]["inputs"][0]["shape"] = [2, 8]
    m["streams"]["num_streams"] = True
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError, match=r"disagree on \['streams'\]"):
        mtcompile.load(saved)
    m["streams"]["num_streams"] = 1
    m["memory"]["arena_bytes"] = True  # not embedded, not read by the core: Python's reader
    _write_manifest(saved, m)
    with pytest.raises(
        ArtifactError,
        match=r"key 'memory.arena_bytes': expected int, found "
        "bool True",
    ):
        mtcompile.load(saved)


@pytest.mark.parametrize(
    ("fmt", "hint"),
    [
        ("mtcompile-bundle/0", "; rebuild the bundle with this mtcompile"),
        ("mtcompile-bundle/1", "; rebuild the bundle with this mtcompile"),  # the dict layout
        ("other/9", ""),
        (None, ""),
    ],
)
def test_load_wrong_format(saved, fmt, hint):
    m = _manifest(saved)
    m["format"] = fmt
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    assert str(info.value) == (
        f"{saved / MANIFEST}: format {fmt!r}, this mtcompile reads {FORMAT!r}{hint}"
    )


def test_load_refuses_a_bundle_built_with_another_tvm(saved):
    # TVM's executable format is not stable across versions: refused before the library
    # is opened, naming both versions. Other versions are recorded for information only.
    m = _manifest(saved)
    m["versions"]["torch"] = "0.0.1"
    m["versions"]["onnx"] = "0.0.1"
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError, match=r"disagree on \['versions'\]"):
        mtcompile.load(saved)  # torch/onnx pass the version check; the embedded copy tells
    m["versions"]["tvm"] = "0.19.0"
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    assert str(info.value) == (
        f"{saved / MANIFEST}: built with TVM 0.19.0, this process has "
        f"TVM {tvm.__version__}; TVM's executable format is not stable "
        "across versions: rebuild the bundle with this TVM"
    )


def test_load_library_from_a_different_build(saved, other_saved):
    shutil.copyfile(other_saved / "bundle.so", saved / "bundle.so")
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    msg = str(info.value)
    assert msg.startswith(
        f"{saved / 'bundle.so'} does not match {saved / MANIFEST}: library sha256 "
    )
    assert msg.endswith("the files come from different builds")


def test_load_library_with_a_flipped_byte(saved):
    lib = saved / "bundle.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0x01
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="the files come from different builds"):
        mtcompile.load(saved)


def test_load_embedded_manifest_disagrees(saved, other_saved):
    # Someone "fixed" the hash by hand: the manifest inside the library still tells.
    shutil.copyfile(other_saved / "bundle.so", saved / "bundle.so")
    m = _manifest(saved)
    m["library_sha256"] = _manifest(other_saved)["library_sha256"]
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError) as info:
        mtcompile.load(saved)
    assert str(info.value).startswith(f"{saved / 'bundle.so'} and {saved / MANIFEST} disagree on [")
    assert "'tenant_order'" in str(info.value) and "'tenants'" in str(info.value)


def test_load_manifest_edited_by_hand(saved):
    m = _manifest(saved)
    m["tenants"]["lin"]["inputs"][0]["shape"] = [4, 8]
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError, match=r"disagree on \['tenants'\]"):
        mtcompile.load(saved)


def test_load_library_that_is_not_a_library(saved):
    lib = saved / "bundle.so"
    lib.write_bytes(b"\x7fELF but not really" * 50)
    m = _manifest(saved)
    m["library_sha256"] = artifact.sha256_file(lib)
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError, match=re.escape(f"{lib}: cannot be loaded by TVM: ")):
        mtcompile.load(saved)


@pytest.mark.slow  # compiles a library of its own
def test_load_library_without_embedded_manifest(saved):
    x = relax.Var("x", relax.TensorType([2], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(x)
    lib = saved / "bundle.so"
    tvm.compile(bb.get(), "llvm").export_library(str(lib))
    m = _manifest(saved)
    m["library_sha256"] = artifact.sha256_file(lib)
    _write_manifest(saved, m)
    with pytest.raises(ArtifactError, match=re.escape(f"{lib}: has no readable embedded manifest")):
        mtcompile.load(saved)


# --------------------------------------------------------------------------- saving


def _listing(d):
    return sorted(os.listdir(d))


@pytest.mark.parametrize("where", ["export_library", "hash"])
def test_failed_save_leaves_the_earlier_bundle(saved, lin_pair, monkeypatch, where):
    before = {p: (saved / p).read_bytes() for p in _listing(saved)}
    newer = lin_pair[0]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    if where == "export_library":
        monkeypatch.setattr(type(newer.executable), "export_library", fail)
    else:  # after the library is written, before anything is renamed into place
        monkeypatch.setattr(artifact, "sha256_file", fail)
    with pytest.raises(OSError, match="disk full"):
        newer.save(saved)
    monkeypatch.undo()
    assert _listing(saved) == sorted(before)  # no temp files left behind
    assert {p: (saved / p).read_bytes() for p in _listing(saved)} == before
    old = mtcompile.load(saved)
    assert old.tenant_names == ["lin", "conv", "multi"]
    assert old.run("multi", np.ones((3, 5), np.float32))[1].tolist() == [10.0, 10.0, 10.0]
    # The same save succeeds once the failure is gone, and replaces the bundle.
    newer.save(saved)
    assert mtcompile.load(saved).tenant_names == ["lin"]
    assert _listing(saved) == ["bundle.so", MANIFEST]


def test_save_into_a_file_path_fails_cleanly(tiny_bundle, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises((OSError, MTCompileError)):
        tiny_bundle.save(f)
    assert f.read_text() == "x"


def test_load_error_is_not_a_crash(saved, tiny_bundle):
    # After a refused load the process and other bundles keep working.
    (saved / "bundle.so").write_bytes(b"")
    with pytest.raises(ArtifactError):
        mtcompile.load(saved)
    x = seeded_input(0, 2, 8)
    assert tiny_bundle.run("lin", x)[0].shape == (2, 4)
