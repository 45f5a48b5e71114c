"""The op facts our own fusion groups by (`analysis.schedule.op_kind`), and the kernel model
on a model whose residuals the ONNX importer writes with same-shape broadcasts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import F23, WKEY, attrs
from onnx import TensorProto, helper, numpy_helper
from test_emitted import check_dag

import mtcompile
from mtcompile.analysis.schedule import op_kind
from mtcompile.ir import ops
from mtcompile.ir.graph import INPUT, ConstRef, Node, Ref


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
    relu = Node("t.r", "relax.nn.relu", (Ref("t.mm"),), F23, ("t",))
    assert op_kind(call) == "library" and op_kind(tvm_mm) == "anchor"
    assert op_kind(relu) == "elemwise" and op_kind(Node("t.x", INPUT, (), F23, ("t",))) == "anchor"


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


@pytest.mark.slow  # compiles bundles of their own
def test_onnx_sum_residuals_plan_on_tvms_kernels_and_match_onnxruntime():
    """ONNX Sum imports as broadcast_to(x, its own shape) + stack + sum: whatever TVM makes
    of the broadcasts (views or kernels), the DAG has its kernels, and the bundle built on
    streams (two tenants) does not fall back and matches onnxruntime."""
    from test_memory import front

    tenants = [mtcompile.Tenant(f"res{i}", _residual_onnx()) for i in range(2)]
    check_dag(front(tenants)[0])
    bundle = mtcompile.compile(tenants, pass_options={"assign-streams": {"policy": "max"}})
    assert "streams_dropped" not in bundle.report()["build"]
    result = bundle.verify()
    assert result["ok"], result
