"""The kernel model (`analysis.schedule.kernel_dag`): which nodes are kernels, views or folded
away, read from the graph alone; and a model TVM's Relax agrees with (no memory mismatch)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import F23, F24, WKEY, W, attrs
from onnx import TensorProto, helper, numpy_helper

import mtcompile
from mtcompile.analysis.schedule import kernel_dag, op_kind
from mtcompile.ir import ops
from mtcompile.ir.graph import INPUT, ConstRef, Graph, Node, Opaque, Ref, TenantIO, TensorTy


def _graph(*body: Node) -> Graph:
    nodes = (Node("t.x", INPUT, (), F24, ("t",)), *body)
    g = Graph(nodes, {"t": TenantIO((("x", "t.x"),), (Ref(nodes[-1].name),))}, {WKEY: W})
    g.verify()
    return g


def _shape(*dims: int) -> Opaque:
    return Opaque(None, f"shape{dims}", f"R.shape({list(dims)})")


def test_library_call_nodes_are_library_kernels_and_tvm_heavy_ops_anchors():
    call = Node(
        "t.mm",
        ops.LIBRARY_CALL,
        (Ref("t.x"), ConstRef(WKEY)),
        F23,
        ("t",),
        ops.LibraryCall("native", "matmul"),
    )
    tvm_mm = Node(
        "t.mm2",
        "relax.matmul",
        (Ref("t.x"), ConstRef(WKEY)),
        F23,
        ("t",),
        attrs("out_dtype=float32"),
    )
    assert op_kind(call) == "library" and op_kind(tvm_mm) == "anchor"
    relu = Node("t.r", "relax.nn.relu", (Ref("t.mm"),), F23, ("t",))
    dag = kernel_dag(_graph(call, relu))
    assert [(k.name, k.kind) for k in dag.kernels] == [("t.mm", "library"), ("t.r", "tvm")]
    assert dag.deps["t.r"] == ("t.mm",)


def test_same_shape_broadcast_alone_is_a_view_of_its_input():
    # ONNX Sum imports as broadcast_to(x, its own shape) + stack + sum: TVM makes a kernel
    # of the broadcast alone a view, so its input stays live until the view's reader runs
    relu = Node("t.r", "relax.nn.relu", (Ref("t.x"),), F24, ("t",), group="g0")
    same = Node("t.b", "relax.broadcast_to", (Ref("t.r"), _shape(2, 4)), F24, ("t",), group="g1")
    exp = Node("t.e", "relax.exp", (Ref("t.b"),), F24, ("t",), group="g2")
    dag = kernel_dag(_graph(relu, same, exp))
    assert dag.kernel("g1").kind == "view" and dag.kernel("g1").tensor is None
    assert dag.alias["t.b"] == "t.r" and dag.kernel("g2").reads == ("t.r",)


def test_negative_a_broadcast_that_grows_the_shape_is_a_kernel():
    relu = Node("t.r", "relax.nn.relu", (Ref("t.x"),), F24, ("t",), group="g0")
    grow = Node(
        "t.b",
        "relax.broadcast_to",
        (Ref("t.r"), _shape(3, 2, 4)),
        TensorTy((3, 2, 4), "float32"),
        ("t",),
        group="g1",
    )
    dag = kernel_dag(_graph(relu, grow))
    assert dag.kernel("g1").kind == "tvm" and dag.kernel("g1").tensor == "t.b"


def test_values_of_constants_alone_are_no_kernels():
    wt = Node(
        "t.wt",
        "relax.permute_dims",
        (ConstRef(WKEY),),
        TensorTy((3, 4), "float32"),
        ("t",),
        attrs("axes=[1,0]"),
    )
    relu = Node("t.r", "relax.nn.relu", (Ref("t.x"),), F24, ("t",))
    dag = kernel_dag(_graph(wt, relu))
    assert [k.name for k in dag.kernels] == ["t.r"]


def _residual_onnx(blocks: int = 3) -> onnx.ModelProto:
    """`blocks` times h = relu(Sum(conv(h), h)) (residuals the ONNX importer writes with
    broadcasts), then a last conv."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.2
    b = rng.standard_normal(4).astype(np.float32)
    nodes, h = [], "x"
    for i in range(blocks):
        nodes += [
            helper.make_node("Conv", [h, "w", "b"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Sum", [f"c{i}", h], [f"s{i}"]),
            helper.make_node("Relu", [f"s{i}"], [f"h{i}"]),
        ]
        h = f"h{i}"
    nodes.append(helper.make_node("Conv", [h, "w", "b"], ["y"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.slow  # compiles a bundle of its own
def test_onnx_sum_residuals_plan_without_mismatch_and_match_onnxruntime():
    bundle = mtcompile.compile([mtcompile.Tenant("res", _residual_onnx())])
    assert bundle.report()["memory"]["mismatches"] == {}
    result = bundle.verify()
    assert result["ok"], result
