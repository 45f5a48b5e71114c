"""The tenant model zoo: small, seeded, code-defined models and demo tenant sets.

Factories in ``zoo`` return ``(model, example_inputs)`` (``mlp_fx`` returns
``(graph_module, input_shapes)``), build weights deterministically from a seed without
disturbing the caller's RNG, and download nothing. ``sets`` groups them into the
tenant sets used by the demo, tests and benchmarks; ``get_set(name)`` builds one.
``real_onnx(name)`` gives the real CNN architectures shipped in the onnx package.
"""

from .onnx_real import REAL_MODELS, real_onnx
from .sets import SETS, bert4, get_set, heterogeneous, mixed, same_arch, shared_backbone
from .zoo import (
    BERT_MINI,
    bert_mini,
    encoder_onnx,
    head_classes,
    mlp,
    mlp_fx,
    resnet_cnn,
    shared_backbone_tenant,
    transformer_encoder,
    vit,
)

__all__ = [
    "BERT_MINI",
    "REAL_MODELS",
    "SETS",
    "bert4",
    "bert_mini",
    "encoder_onnx",
    "get_set",
    "head_classes",
    "heterogeneous",
    "mlp",
    "mixed",
    "mlp_fx",
    "real_onnx",
    "resnet_cnn",
    "same_arch",
    "shared_backbone",
    "shared_backbone_tenant",
    "transformer_encoder",
    "vit",
]
