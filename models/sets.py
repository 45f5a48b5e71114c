"""Demo tenant sets: the groups of tenants used by the demo, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

from mtcompile.tenant import Tenant

from .zoo import (
    bert_mini,
    encoder_onnx,
    mlp,
    mlp_fx,
    resnet_cnn,
    shared_backbone_tenant,
    transformer_encoder,
    vit,
)


def heterogeneous(batch: int = 1) -> list[Tenant]:
    """Three unrelated tenants, one per frontend.

    "vision": ResNet-style CNN (nn.Module, exported later); "text": transformer
    encoder as an ONNX ModelProto; "mlp": MLP as an fx GraphModule with input_shapes.
    """
    vision, vision_inputs = resnet_cnn(seed=0, batch=batch)
    text, text_inputs = encoder_onnx(seed=1, batch=batch)
    gm, shapes = mlp_fx(seed=2, batch=batch)
    _, mlp_inputs = mlp(seed=2, batch=batch)
    return [
        Tenant("vision", vision, example_inputs=vision_inputs),
        Tenant("text", text, example_inputs=text_inputs),
        Tenant("mlp", gm, example_inputs=mlp_inputs, input_shapes=shapes),
    ]


def same_arch(n: int = 4, batch: int = 1) -> list[Tenant]:
    """``n`` transformer encoders "enc0".."enc{n-1}": same architecture, weights and inputs
    from seeds 0..n-1 (the horizontal-fusion case)."""
    tenants = []
    for i in range(n):
        model, inputs = transformer_encoder(seed=i, batch=batch)
        tenants.append(Tenant(f"enc{i}", model, example_inputs=inputs))
    return tenants


def shared_backbone(n: int = 3, batch: int = 1) -> list[Tenant]:
    """``n`` tenants "head0".."head{n-1}": one backbone (bit-identical weights), different
    heads, and one input declared shared as "image" (the dedup case)."""
    tenants = []
    shared_inputs = None
    for i in range(n):
        model, inputs = shared_backbone_tenant(head_seed=i, backbone_seed=0, batch=batch)
        shared_inputs = shared_inputs if shared_inputs is not None else inputs
        tenants.append(
            Tenant(f"head{i}", model, example_inputs=shared_inputs, shared_inputs={"x": "image"})
        )
    return tenants


def bert4(n: int = 4, batch: int = 1) -> list[Tenant]:
    """``n`` BERT-mini-sized encoders "bert0".."bert{n-1}" (``zoo.BERT_MINI``), weights and
    token ids from seeds 0..n-1: the same-arch case at user scale."""
    tenants = []
    for i in range(n):
        model, inputs = bert_mini(seed=i, batch=batch)
        tenants.append(Tenant(f"bert{i}", model, example_inputs=inputs))
    return tenants


def mixed(batch: int = 1) -> list[Tenant]:
    """Four unrelated tenants at user scale, all ``nn.Module``: "text" a BERT-mini-sized
    encoder, "vit" a ViT-tiny on 96x96 images, "cnn" a ResNet-style CNN (width 32) on
    64x64 images, "mlp" a 512-2048-512 MLP."""
    text, text_inputs = bert_mini(seed=0, batch=batch)
    vit_model, vit_inputs = vit(seed=1, batch=batch)
    cnn, cnn_inputs = resnet_cnn(seed=2, batch=batch, image=64, width=32)
    mlp_model, mlp_inputs = mlp(seed=3, batch=batch)
    return [
        Tenant("text", text, example_inputs=text_inputs),
        Tenant("vit", vit_model, example_inputs=vit_inputs),
        Tenant("cnn", cnn, example_inputs=cnn_inputs),
        Tenant("mlp", mlp_model, example_inputs=mlp_inputs),
    ]


SETS: dict[str, Callable[..., list[Tenant]]] = {
    "heterogeneous": heterogeneous,
    "same-arch": same_arch,
    "shared-backbone": shared_backbone,
    "bert4": bert4,
    "mixed": mixed,
}


def get_set(name: str, **kwargs) -> list[Tenant]:
    """Build the demo set ``name`` (a key of ``SETS``) with keyword options such as ``batch``."""
    try:
        factory = SETS[name]
    except KeyError:
        valid = ", ".join(sorted(SETS))
        raise ValueError(f"unknown tenant set {name!r}; valid names: {valid}") from None
    return factory(**kwargs)
