"""Real CNN architectures shipped inside the `onnx` package (its backend test data), with
seeded random weights.

The packaged `light_*` models build every weight with ConstantOfShape (constant values),
so their outputs are nearly constant and a numerics check on them proves little. Each
ConstantOfShape of a constant shape is replaced here by a seeded random initializer:
weights ~ N(0, 1/fan_in), 1-D tensors (biases, batch-norm parameters) ~ U(0.5, 1.5).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

REAL_MODELS = (
    "squeezenet",
    "inception_v1",
    "resnet50",
    "shufflenet",
    "densenet121",
    "inception_v2",
    "bvlc_alexnet",
    "vgg19",
    "zfnet512",
)


def _data_dir() -> str:
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def real_onnx(name: str, seed: int = 0) -> onnx.ModelProto:
    """The packaged ``light_<name>.onnx`` with seeded random weights (see the module doc)."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(REAL_MODELS)}")
    path = os.path.join(_data_dir(), f"light_{name}.onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not in this onnx installation")
    model = onnx.load(path)
    rng = np.random.default_rng(seed)
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value":
                consts[n.output[0]] = numpy_helper.to_array(a.t)
    kept = []
    for n in g.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in consts:
            kept.append(n)
            continue
        shape = tuple(int(v) for v in consts[n.input[0]])
        if len(shape) <= 1:
            arr = rng.uniform(0.5, 1.5, shape)
        else:
            arr = rng.standard_normal(shape) / np.sqrt(float(np.prod(shape[1:])))
        g.initializer.append(numpy_helper.from_array(arr.astype(np.float32), n.output[0]))
        if model.ir_version < 4:  # old IR versions list every initializer as a graph input
            g.input.append(
                helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, shape)
            )
    del g.node[:]
    g.node.extend(kept)
    return model
