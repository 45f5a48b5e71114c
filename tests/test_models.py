"""Tests of the model zoo and demo tenant sets (fast: no TVM compile)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mtcompile.models import (
    BERT_MINI,
    SETS,
    bert_mini,
    encoder_onnx,
    get_set,
    head_classes,
    mlp,
    mlp_fx,
    resnet_cnn,
    shared_backbone_tenant,
    transformer_encoder,
    vit,
)
from mtcompile.tenant import Tenant

# Small configurations keep the tests fast; defaults are covered by the sets tests.
TORCH_FACTORIES = {
    "resnet_cnn": lambda seed: resnet_cnn(seed, batch=2, image=16, width=8),
    "transformer_encoder": lambda seed: transformer_encoder(seed, batch=2, seq=8),
    "transformer_encoder_cls": lambda seed: transformer_encoder(seed, seq=8, num_classes=3),
    "mlp": lambda seed: mlp(seed, batch=4, d_in=32, hidden=64, d_out=16, layers=3),
    "shared_backbone_tenant": lambda seed: shared_backbone_tenant(seed, backbone_seed=seed),
    "vit": lambda seed: vit(
        seed, batch=2, image=32, patch=8, d_model=32, heads=2, layers=1, ffn=64, num_classes=5
    ),
}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(TORCH_FACTORIES))
def test_factory_is_deterministic(name):
    factory = TORCH_FACTORIES[name]
    (m1, x1), (m2, x2), (m3, x3) = factory(0), factory(0), factory(1)
    assert not m1.training
    assert _same_state(m1, m2)
    assert all(torch.equal(a, b) for a, b in zip(x1, x2, strict=True))
    with torch.no_grad():
        y1, y2 = m1(*x1), m2(*x2)
        assert torch.equal(y1, y2)
        assert torch.isfinite(y1).all()
        # A different seed changes the weights and the output on the same inputs.
        assert not _same_state(m1, m3)
        assert not torch.equal(m3(*x1), y1)
    assert not all(torch.equal(a, b) for a, b in zip(x1, x3, strict=True))


@pytest.mark.parametrize("name", sorted(TORCH_FACTORIES))
def test_factory_leaves_global_rng_alone(name):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    TORCH_FACTORIES[name](0)
    assert torch.equal(torch.rand(4), expected)


def test_output_shapes():
    m, (x,) = resnet_cnn(batch=2, num_classes=7)
    assert x.shape == (2, 3, 32, 32) and m(x).shape == (2, 7)
    m, (ids,) = transformer_encoder(batch=2, seq=16, vocab=50, d_model=32, heads=2)
    assert ids.dtype == torch.int64 and ids.shape == (2, 16)
    assert 0 <= int(ids.min()) and int(ids.max()) < 50
    assert m(ids).shape == (2, 16, 32)
    m, (x,) = mlp(batch=3, d_in=10, hidden=20, d_out=5, layers=1)
    assert m(x).shape == (3, 5)
    m, (x,) = vit(batch=2, image=32, patch=8, d_model=16, heads=2, layers=1, ffn=32)
    assert x.shape == (2, 3, 32, 32) and m(x).shape == (2, 10)
    assert m.pos.shape == (1, 17, 16)  # 4x4 patches + the class token
    with pytest.raises(ValueError, match="patch"):
        vit(image=30, patch=8)


@pytest.mark.slow  # builds and runs the larger models
def test_vit_tiny_and_bert_mini_sizes():
    m, (x,) = vit()
    assert x.shape == (1, 3, 96, 96) and m(x).shape == (1, 10)
    assert len(m.layers) == 4 and m.layers[0].heads == 3 and m.pos.shape == (1, 37, 192)
    assert m.layers[0].ffn1.out_features == 768
    m, (ids,) = bert_mini(seed=1)
    assert ids.shape == (1, BERT_MINI["seq"]) == (1, 64)
    assert len(m.layers) == 4 and m.layers[0].heads == 4
    assert m.layers[0].ffn1.in_features == 256 and m.layers[0].ffn1.out_features == 1024
    assert m(ids).shape == (1, 64, 256)


def test_resnet_batchnorm_stats_are_nontrivial():
    m, _ = resnet_cnn()
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(bns) >= 7  # stem + 3 blocks x 2 + downsample
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_encoder_has_no_fused_attention():
    m, _ = transformer_encoder()
    assert not any(isinstance(mod, torch.nn.MultiheadAttention) for mod in m.modules())


def test_mlp_fx_matches_mlp_and_names_placeholders():
    gm, shapes = mlp_fx(seed=3, batch=4, d_in=32, hidden=64, d_out=16)
    module, (x,) = mlp(seed=3, batch=4, d_in=32, hidden=64, d_out=16)
    assert isinstance(gm, torch.fx.GraphModule)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == list(shapes) == ["x"]
    assert shapes["x"] == ((4, 32), "float32")
    assert tuple(x.shape) == shapes["x"][0] and str(x.dtype) == "torch." + shapes["x"][1]
    with torch.no_grad():
        assert torch.equal(gm(x), module(x))


def test_encoder_onnx_is_valid_and_matches_torch():
    ort = pytest.importorskip("onnxruntime")
    model, (ids,) = encoder_onnx(seed=5, batch=2, seq=8)
    assert isinstance(model, onnx.ModelProto)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert len(model.graph.initializer) > 0  # weights embedded, no external data
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input_ids": ids.numpy()})
    module, (ids2,) = transformer_encoder(seed=5, batch=2, seq=8)
    assert torch.equal(ids, ids2)
    with torch.no_grad():
        want = module(ids).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    again, _ = encoder_onnx(seed=5, batch=2, seq=8)
    assert again.SerializeToString() == model.SerializeToString()


def test_shared_backbone_tenants_share_backbone_only():
    (a, xa), (b, xb) = shared_backbone_tenant(0), shared_backbone_tenant(1)
    assert _same_state(a.features, b.features)
    assert torch.equal(xa[0], xb[0])
    assert not _same_state(a.head, b.head)
    with torch.no_grad():
        assert a(*xa).shape[-1] == head_classes(0) != b(*xb).shape[-1] == head_classes(1)
    c, _ = shared_backbone_tenant(0, backbone_seed=1)
    assert not _same_state(a.features, c.features)
    d, _ = shared_backbone_tenant(2, num_classes=4)
    assert d.head[-1].out_features == 4


def _check_tenants(tenants, names):
    assert [t.name for t in tenants] == names
    for t in tenants:
        assert isinstance(t, Tenant)
        assert t.example_inputs is not None


def test_heterogeneous_set():
    tenants = get_set("heterogeneous")
    _check_tenants(tenants, ["vision", "text", "mlp"])
    vision, text, mlp_t = tenants
    assert isinstance(vision.model, torch.nn.Module)
    assert isinstance(text.model, onnx.ModelProto)
    assert isinstance(mlp_t.model, torch.fx.GraphModule)
    assert list(mlp_t.input_shapes) == ["x"]
    with torch.no_grad():
        vision.model(*vision.example_inputs)
        mlp_t.model(*mlp_t.example_inputs)


def test_same_arch_set():
    tenants = get_set("same-arch", n=3, batch=2)
    _check_tenants(tenants, ["enc0", "enc1", "enc2"])
    assert tenants[0].example_inputs[0].shape[0] == 2
    assert not _same_state(tenants[0].model, tenants[1].model)
    assert not torch.equal(tenants[0].example_inputs[0], tenants[1].example_inputs[0])
    assert [k for k in _state(tenants[0].model)] == [k for k in _state(tenants[1].model)]


def test_shared_backbone_set():
    tenants = get_set("shared-backbone")
    _check_tenants(tenants, ["head0", "head1", "head2"])
    first = tenants[0]
    for t in tenants[1:]:
        assert t.example_inputs[0] is first.example_inputs[0]
        assert _same_state(t.model.features, first.model.features)
        assert not _same_state(t.model.head, first.model.head)


def test_bert4_set():
    tenants = get_set("bert4")
    _check_tenants(tenants, ["bert0", "bert1", "bert2", "bert3"])
    assert tenants[0].example_inputs[0].shape == (1, 64)
    assert not _same_state(tenants[0].model, tenants[3].model)
    assert not torch.equal(tenants[0].example_inputs[0], tenants[1].example_inputs[0])


@pytest.mark.slow  # builds and runs the larger models
def test_mixed_set():
    tenants = get_set("mixed")
    _check_tenants(tenants, ["text", "vit", "cnn", "mlp"])
    shapes = {"text": (1, 64), "vit": (1, 3, 96, 96), "cnn": (1, 3, 64, 64), "mlp": (1, 512)}
    for t in tenants:
        assert isinstance(t.model, torch.nn.Module)
        assert tuple(t.example_inputs[0].shape) == shapes[t.name]
        with torch.no_grad():
            assert torch.isfinite(t.model(*t.example_inputs)).all()


def test_sets_registry():
    assert set(SETS) == {"heterogeneous", "same-arch", "shared-backbone", "bert4", "mixed"}
    with pytest.raises(ValueError, match="same-arch"):
        get_set("nope")
