"""Indexing at computed positions: PyTorch's ``index.Tensor`` / ``index_put`` and ONNX's
``GatherND`` / ``ScatterND`` match their source framework, accept what it accepts (negative
indices) and refuse an index out of range with an error naming the tenant and input. TVM's
own kernels for these read and write unchecked: an index out of range read another element
silently, or wrote past the tensor and crashed the process."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import torch_outputs
from onnx import TensorProto, helper
from torch.export import Dim

import mtcompile
from mtcompile import Tenant
from mtcompile.errors import MTCompileError

pytestmark = pytest.mark.slow  # builds two bundles of its own


class Gathers(torch.nn.Module):
    """Every layout of advanced indexing: one index, zipped, zipped after a slice (the
    broadcast dims stay in place), separated by a slice (they go first), broadcast."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(
            torch.randn(10, 4, 3, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, i, j):
        w = self.w
        return (
            w[i],
            w[i, j],
            w[:, j, j.clamp(0, 2)],
            w[i, :, j.clamp(0, 2)],
            w[i.unsqueeze(1), j.unsqueeze(0)],
        )


class Puts(torch.nn.Module):
    """An in-place write at computed indices."""

    def forward(self, x, i):
        y = x.clone()
        y[i] = 5.0
        return y * 2.0


class Rows2(torch.nn.Module):
    """Writes of rows at computed indices into a 2-D tensor: ``y[i] = v`` (a row broadcast
    to each), ``index_add`` (repeated indices add up), ``index_copy``, ``index_fill``, and
    ``y[:, j] = c`` (an indexed axis after a slice)."""

    def forward(self, x, i, j):
        y = x.clone()
        y[i] = torch.arange(4.0)
        rows = torch.ones(3, 4)
        return (
            y,
            x.index_add(0, i, rows),
            x.index_copy(0, i, rows),
            x.index_fill(0, i, 2.0),
            _put_cols(x, j),
        )


def _put_cols(x, j):
    y = x.clone()
    y[:, j] = 7.0
    return y


class Rows(torch.nn.Module):
    """Two indices into a tensor of dynamic extent along the first."""

    def forward(self, x, i, j):
        return x[i, j] + 1.0


def _onnx(op: str) -> onnx.ModelProto:
    ins = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 6]),
        helper.make_tensor_value_info("i", TensorProto.INT64, [2, 2]),
    ]
    if op == "ScatterND":
        ins.append(helper.make_tensor_value_info("u", TensorProto.FLOAT, [2]))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2] if op == "GatherND" else [5, 6])
    node = helper.make_node(op, [v.name for v in ins], ["y"])
    graph = helper.make_graph([node], op, ins, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


IDX = torch.tensor([1, 2, 3])
J = torch.tensor([0, 1, 2])
X10 = torch.zeros(10)
X = torch.arange(30, dtype=torch.float32).reshape(5, 6)


@pytest.fixture(scope="module")
def torch_bundle():
    dyn = {"x": {0: Dim("batch", min=1, max=8)}, "i": None, "j": None}
    return mtcompile.compile(
        [
            Tenant("gathers", Gathers(), example_inputs=(IDX, J)),
            Tenant("puts", Puts(), example_inputs=(X10, IDX)),
            Tenant("rows2", Rows2(), example_inputs=(torch.zeros(6, 4), IDX, J)),
            Tenant("rows", Rows(), example_inputs=(torch.randn(6, 4), IDX, J), dynamic_shapes=dyn),
        ]
    )


@pytest.fixture(scope="module")
def onnx_bundle():
    return mtcompile.compile(
        [Tenant("gather", _onnx("GatherND")), Tenant("scatter", _onnx("ScatterND"))]
    )


@pytest.mark.parametrize("i, j", [([1, 2, 3], [0, 1, 2]), ([-1, -10, 9], [-3, 2, -1])])
def test_index_tensor_matches_pytorch_in_every_layout(torch_bundle, i, j):
    ti, tj = torch.tensor(i), torch.tensor(j)
    got = torch_bundle.run("gathers", ti.numpy(), tj.numpy())
    want = torch_outputs(Gathers(), (ti, tj))  # the same seeded weights
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    "i, j, bad",
    [([1, 2, 10], [0, 1, 2], "'i'"), ([1, 2, 3], [0, 1, 4], "'j'"), ([1, 2, 3], [-5, 0, 0], "'j'")],
)
def test_index_tensor_refuses_an_index_out_of_range(torch_bundle, i, j, bad):
    with pytest.raises(MTCompileError, match=rf"tenant 'gathers', input {bad}"):
        torch_bundle.run("gathers", np.array(i), np.array(j))


def test_index_put_writes_where_pytorch_does_and_refuses_out_of_range(torch_bundle):
    for i in ([1, 2, -1], [0, 9, 9]):
        ti = torch.tensor(i)
        np.testing.assert_array_equal(
            torch_bundle.run("puts", X10.numpy(), ti.numpy())[0],
            torch_outputs(Puts(), (X10, ti))[0],
        )
    for i in ([1, 2, 10], [1, 2, 10**8], [-11, 0, 0]):  # wrote past the tensor (10**8: a segfault)
        with pytest.raises(MTCompileError, match="tenant 'puts', input 'i'"):
            torch_bundle.run("puts", X10.numpy(), np.array(i))


def test_row_writes_with_fewer_indices_than_dims_match_pytorch(torch_bundle):
    """TVM's converter refused these (one index tensor per axis) and read values of a
    smaller shape than the indices past their end."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    for i, j in (([0, 2, 5], [0, 1, 3]), ([5, 0, 3], [-4, 2, -1])):
        ti, tj = torch.tensor(i), torch.tensor(j)
        got = torch_bundle.run("rows2", x.numpy(), ti.numpy(), tj.numpy())
        for g, w in zip(got, torch_outputs(Rows2(), (x, ti, tj)), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6)
    with pytest.raises(MTCompileError, match="tenant 'rows2', input 'i'"):
        torch_bundle.run("rows2", x.numpy(), np.array([0, 2, 6]), np.array([0, 1, 3]))


def test_two_indices_into_a_dynamic_extent_are_checked_at_the_call(torch_bundle):
    x = torch.randn(3, 4)
    i, j = torch.tensor([0, 2, -1]), torch.tensor([3, 0, 1])
    np.testing.assert_allclose(
        torch_bundle.run("rows", x.numpy(), i.numpy(), j.numpy())[0],
        torch_outputs(Rows(), (x, i, j))[0],
    )
    with pytest.raises(MTCompileError, match="tenant 'rows'"):
        torch_bundle.run("rows", x.numpy(), np.array([0, 2, 3]), j.numpy())  # row 3 of 3


def _ort(op: str, *inputs):
    sess = ort.InferenceSession(_onnx(op).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [v.name for v in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs, strict=True)))[0]


def test_gather_nd_and_scatter_nd_match_onnxruntime(onnx_bundle):
    x, u = X.numpy(), np.array([7.0, 9.0], dtype=np.float32)
    for idx in ([[0, 1], [4, 5]], [[0, 1], [-1, -6]]):
        i = np.array(idx)
        np.testing.assert_array_equal(onnx_bundle.run("gather", x, i)[0], _ort("GatherND", x, i))
        np.testing.assert_array_equal(
            onnx_bundle.run("scatter", x, i, u)[0], _ort("ScatterND", x, i, u)
        )


@pytest.mark.parametrize("idx", [[[0, 1], [1, 6]], [[0, 1], [5, 0]], [[0, 1], [10**7, 0]]])
def test_gather_nd_and_scatter_nd_refuse_a_coordinate_out_of_range(onnx_bundle, idx):
    # [1, 6] of a 5x6 tensor read [2, 0]; 10**7 wrote past the tensor (a segfault)
    x, i, u = X.numpy(), np.array(idx), np.ones(2, dtype=np.float32)
    with pytest.raises(MTCompileError, match="tenant 'gather', input 'i'"):
        onnx_bundle.run("gather", x, i)
    with pytest.raises(MTCompileError, match="tenant 'scatter', input 'i'"):
        onnx_bundle.run("scatter", x, i, u)
