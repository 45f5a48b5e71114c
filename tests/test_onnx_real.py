"""Real CNN architectures from the onnx package, merged into one bundle, against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

import mtcompile
from mtcompile import Tenant
from mtcompile.models import real_onnx


def test_real_onnx_weights_are_seeded_random():
    a, b, c = real_onnx("squeezenet", 0), real_onnx("squeezenet", 0), real_onnx("squeezenet", 1)
    assert not any(n.op_type == "ConstantOfShape" for n in a.graph.node)
    init = {i.name: i.raw_data for i in a.graph.initializer}
    assert init == {i.name: i.raw_data for i in b.graph.initializer}
    assert init != {i.name: i.raw_data for i in c.graph.initializer}
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        real_onnx("nope")


@pytest.mark.slow
def test_real_architectures_in_one_bundle_match_onnxruntime():
    # SqueezeNet (fire modules, concat) and Inception v1 (LRN, multi-branch) in one library
    tenants = [
        Tenant("squeezenet", real_onnx("squeezenet")),
        Tenant("inception", real_onnx("inception_v1")),
    ]
    bundle = mtcompile.compile(tenants)
    result = bundle.verify()
    for name, entry in result["tenants"].items():
        assert entry["ok"], (name, entry)
        assert entry["outputs"][0]["max_rel"] < 1e-5
    # the outputs really vary with the input (random weights, not constants)
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    y = np.random.default_rng(4).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert not np.allclose(bundle.run("squeezenet", x)[0], bundle.run("squeezenet", y)[0])
