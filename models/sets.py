"""Demo tenant sets: the groups of tenants used by the demo, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

from mtcompile.tenant import Tenant

from .zoo import encoder_onnx, mlp, mlp_fx, resnet_cnn, shared_backbone_tenant, transformer_encoder


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
        tenants.append(Tenant(f"head{i}", model, example_inputs=shared_inputs,
                              shared_inputs={"x": "image"}))
    return tenants


SETS: dict[str, Callable[..., list[Tenant]]] = {
    "heterogeneous": heterogeneous,
    "same-arch": same_arch,
    "shared-backbone": shared_backbone,
}


def get_set(name: str, **kwargs) -> list[Tenant]:
    """Build the demo set ``name`` (a key of ``SETS``) with keyword options such as ``batch``."""
    try:
        factory = SETS[name]
    except KeyError:
        valid = ", ".join(sorted(SETS))
        raise ValueError(f"unknown tenant set {name!r}; valid names: {valid}") from None
    return factory(**kwargs)
