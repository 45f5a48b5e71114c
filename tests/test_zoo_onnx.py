"""The real-model zoo exported to ONNX (torch.onnx, dynamo, opset 18) as ONNX tenants, and
our converters of the ONNX ops TVM's importer turns into TE computations, against
onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mtcompile
from mtcompile import Tenant
from mtcompile.errors import TenantError, UnsupportedOperatorError
from mtcompile.models.hf import REAL_ZOO, real_onnx

TOLERANCE = 1e-4  # max|bundle - onnxruntime| / max|onnxruntime|


def ort_run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def max_rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


@pytest.mark.slow  # exports real models to ONNX
def test_real_onnx_exports_opset_18_with_static_inputs_and_embedded_weights(capfd):
    proto, (x,) = real_onnx("resnet", seed=1, batch=2)
    assert capfd.readouterr() == ("", "")  # quiet: no progress lines, no warnings
    assert isinstance(proto, onnx.ModelProto)
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [
        ("", 18)
    ]
    inits = {i.name for i in proto.graph.initializer}
    assert len(inits) > 10 and not any(
        i.data_location == TensorProto.EXTERNAL for i in proto.graph.initializer
    )
    inputs = [i for i in proto.graph.input if i.name not in inits]
    assert len(inputs) == 1
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    assert dims == list(x.shape) == [2, 3, 32, 32]  # static shapes, the batch asked for
    assert inputs[0].type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.checker.check_model(proto)
    (ref,) = ort_run(proto, {inputs[0].name: x.numpy()})
    assert ref.shape == (2, 10) and np.isfinite(ref).all()


def _const(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _converter_model() -> onnx.ModelProto:
    """One graph holding every case of our converters (onnx_converters): Clip with constant,
    one-sided, NaN, computed and integer bounds; Pad constant / reflect / edge (with axes);
    Tile; reverse CumSum; Einsum; GatherND and ScatterND (a negative coordinate)."""
    n = helper.make_node
    nodes = [
        n("Clip", ["x", "lo", "hi"], ["clip_both"], name="clip_both"),
        n("Clip", ["x", "lo"], ["clip_min"], name="clip_min"),
        n("Clip", ["x", "", "hi"], ["clip_max"], name="clip_max"),
        n("Clip", ["x", "nan", "hi"], ["clip_nan"], name="clip_nan"),
        n("ReduceMean", ["x"], ["mean"], keepdims=0),
        n("Clip", ["x", "mean", "hi"], ["clip_computed"], name="clip_computed"),
        n("Clip", ["x", "hi", "lo"], ["clip_crossed"], name="clip_crossed"),  # lo > hi
        n("Mul", ["x", "ten"], ["x10"]),
        n("Cast", ["x10"], ["xi"], to=TensorProto.INT32),
        n("Clip", ["xi", "ilo", "ihi"], ["clip_int"], name="clip_int"),
        n("Pad", ["x", "pads", "pad_value"], ["pad_const"], mode="constant"),
        n("Pad", ["x", "pads"], ["pad_reflect"], mode="reflect"),
        n("Pad", ["x", "pads_hw", "", "axes_hw"], ["pad_edge"], mode="edge"),
        n("Tile", ["x", "reps"], ["tile"]),
        n("CumSum", ["x", "axis2"], ["cumsum_rev_excl"], reverse=1, exclusive=1),
        n("CumSum", ["x", "axis_last"], ["cumsum_rev"], reverse=1),
        n("Einsum", ["x", "x"], ["einsum"], equation="bchw,bckw->bchk"),
        n("GatherND", ["x", "coords"], ["gather_nd"]),
        n("ScatterND", ["x", "coords", "updates"], ["scatter_nd"]),
    ]
    inits = [
        _const("lo", -0.5),
        _const("hi", 0.7),
        _const("nan", np.nan),
        _const("ten", 10.0),
        _const("ilo", -3, np.int32),
        _const("ihi", 4, np.int32),
        _const("pads", [0, 0, 1, 2, 0, 1, 0, 1], np.int64),
        _const("pad_value", 1.5),
        _const("pads_hw", [1, 2, 3, 0], np.int64),
        _const("axes_hw", [-2, -1], np.int64),
        _const("reps", [1, 2, 1, 3], np.int64),
        _const("axis2", 2, np.int64),
        _const("axis_last", -1, np.int64),
        _const("coords", [[0, 1], [1, -1]], np.int64),  # GatherND / ScatterND: [n, c] pairs
        _const("updates", np.arange(40, dtype=np.float32).reshape(2, 4, 5)),
    ]
    outs = [o for node in nodes for o in node.output if o not in ("mean", "x10", "xi")]
    graph = helper.make_graph(
        nodes,
        "converters",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # outputs' types
    assert all(o.type.tensor_type.elem_type for o in model.graph.output)
    onnx.checker.check_model(model)
    return model


@pytest.mark.slow  # compiles bundles of its own
def test_our_onnx_converters_match_onnxruntime():
    from mtcompile.frontend.importers import import_tenant
    from mtcompile.frontend.onnx_converters import CONVERTERS

    model = _converter_model()
    assert {n.op_type for n in model.graph.node} >= set(CONVERTERS)
    # every op imports as Relax operators: no TE computation left for the graph lift
    mod = import_tenant(Tenant("conv", model)).mod
    assert "call_tir" not in mod["main"].script()
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    refs = ort_run(model, {"x": x})
    outs = mtcompile.compile([Tenant("conv", model)]).run("conv", x)
    assert len(outs) == len(refs)
    for o, out, ref in zip(model.graph.output, outs, refs, strict=True):
        out = np.asarray(out)
        assert out.dtype == ref.dtype, o.name
        assert max_rel(out, ref) <= 1e-6, o.name


def _one_node_model(node, inputs, output, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", inputs, [output], initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_an_op_left_as_a_te_computation_is_named_with_its_node():
    # Tile with repeats computed at run time: TVM's converter emits a TE kernel (dyn_tile)
    model = _one_node_model(
        helper.make_node("Tile", ["x", "reps"], ["y"], name="tile_dyn"),
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("reps", TensorProto.INT64, [2]),
        ],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["h", "w"]),
    )
    with pytest.raises(
        UnsupportedOperatorError,
        match=r"tenant 'dyn'.*\n.*Tile \(from node "
        r"'tile_dyn': TVM's converter emits",
    ):
        mtcompile.compile([Tenant("dyn", model)])


def test_a_converter_failure_names_the_tenant_node_and_op():
    # CumSum's axis computed at run time: TVM's converter refuses it
    model = _one_node_model(
        helper.make_node("CumSum", ["x", "axis"], ["y"], name="scan"),
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("axis", TensorProto.INT64, []),
        ],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
    )
    with pytest.raises(
        TenantError,
        match=r"tenant 'scan_dyn': TVM's ONNX importer failed on "
        r"ONNX node 'scan' \(op CumSum\): ValueError",
    ):
        mtcompile.compile([Tenant("scan_dyn", model)])


@pytest.mark.slow  # compiles bundles of its own
def test_a_matmul_on_an_item_of_a_split_compiles():
    # GPT-NeoX's export multiplies items of a Split: the native matmul's dense packing read
    # the weight's producer's attrs as TVM attrs, and a get_item's attrs is its index (an int)
    n = helper.make_node
    model = _one_node_model(
        n("Split", ["x"], ["a", "b"], axis=0, num_outputs=2),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 4]),
    )
    model.graph.node.append(n("MatMul", ["a", "b"], ["y"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4]))
    x = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    (out,) = mtcompile.compile([Tenant("split_mm", model)]).run("split_mm", x)
    assert max_rel(out, x[:4] @ x[4:]) <= 1e-6


# a representative handful: encoders (RoBERTa's CumSum), decoders (GPT-2's Gemm/Split,
# Llama's rotary and GQA, GPT-NeoX's matmuls on Split items), vision (ViT, ConvNeXt,
# MobileNetV2's Clip, Swin's Pad), audio (Whisper, wav2vec2)
SLOW_SET = [
    n
    for n in (
        "bert",
        "roberta",
        "gpt2",
        "llama",
        "gpt_neox",
        "vit",
        "convnext",
        "mobilenet_v2",
        "swin",
        "whisper_encoder",
        "wav2vec2",
    )
    if n in REAL_ZOO
]


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_SET)
def test_zoo_onnx_export_compiles_and_matches_onnxruntime(name):
    proto, (x,) = real_onnx(name)
    (ref,) = ort_run(proto, {proto.graph.input[0].name: x.numpy()})
    bundle = mtcompile.compile([Tenant(name, proto)])
    (out,) = bundle.run(name, x.numpy())
    assert max_rel(out, ref) <= TOLERANCE
