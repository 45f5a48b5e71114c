"""Model factories: small, seeded, code-defined models with seeded example inputs.

Every factory builds its weights from ``seed`` without touching the caller's
global torch RNG, returns the model in eval mode, and needs no downloads.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import onnx
import torch
from torch import nn

from .nets import MLP, Classifier, ResNetFeatures, TransformerEncoder, ViT

ONNX_OPSET = 17
ENCODER_INPUT_NAME = "input_ids"
ENCODER_OUTPUT_NAME = "output"


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global CPU RNG for module init, restoring the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: never reseeds CUDA generators
        yield


def _gen(seed: int) -> torch.Generator:
    # Example inputs use their own stream so they never depend on model size.
    return torch.Generator().manual_seed(1_000_003 * (seed + 1))


def _finish(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def resnet_cnn(
    seed: int = 0, batch: int = 1, image: int = 32, width: int = 16, num_classes: int = 10
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """ResNet-style CNN on (batch, 3, image, image) float32 images -> (batch, num_classes)."""
    with seeded(seed):
        features = ResNetFeatures(width)
        model = Classifier(features, nn.Linear(features.out_features, num_classes))
    x = torch.randn(batch, 3, image, image, generator=_gen(seed))
    return _finish(model), (x,)


def vit(
    seed: int = 0,
    batch: int = 1,
    image: int = 96,
    patch: int = 16,
    d_model: int = 192,
    heads: int = 3,
    layers: int = 4,
    ffn: int = 768,
    num_classes: int = 10,
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """ViT (tiny by default) on (batch, 3, image, image) float32 images -> (batch, num_classes)."""
    with seeded(seed):
        model = ViT(image, patch, d_model, heads, layers, ffn, num_classes)
    x = torch.randn(batch, 3, image, image, generator=_gen(seed))
    return _finish(model), (x,)


def token_ids(seed: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Seeded int64 token ids of shape (batch, seq) in [0, vocab)."""
    return torch.randint(0, vocab, (batch, seq), generator=_gen(seed), dtype=torch.int64)


def transformer_encoder(
    seed: int = 0,
    batch: int = 1,
    seq: int = 32,
    vocab: int = 128,
    d_model: int = 64,
    heads: int = 4,
    layers: int = 2,
    ffn: int = 256,
    num_classes: int | None = None,
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Pre-norm transformer encoder on int64 token ids (batch, seq).

    Returns hidden states (batch, seq, d_model), or (batch, num_classes) logits
    from mean pooling when ``num_classes`` is given.
    """
    with seeded(seed):
        model = TransformerEncoder(vocab, seq, d_model, heads, layers, ffn, num_classes)
    return _finish(model), (token_ids(seed, batch, seq, vocab),)


BERT_MINI = {"seq": 64, "vocab": 8192, "d_model": 256, "heads": 4, "layers": 4, "ffn": 1024}
"""BERT-mini sizes (4 layers, hidden 256, 4 heads, FFN 1024) at sequence 64; the vocabulary
is cut from 30522 to 8192 to keep bundles small (the embedding is a gather: no FLOPs)."""


def bert_mini(seed: int = 0, batch: int = 1) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A ``transformer_encoder`` of ``BERT_MINI`` size -> hidden states (batch, 64, 256)."""
    return transformer_encoder(seed, batch, **BERT_MINI)


def mlp(
    seed: int = 0,
    batch: int = 8,
    d_in: int = 512,
    hidden: int = 2048,
    d_out: int = 512,
    layers: int = 2,
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Linear/ReLU stack on (batch, d_in) float32 -> (batch, d_out); ``layers`` Linear layers."""
    with seeded(seed):
        model = MLP(d_in, hidden, d_out, layers)
    x = torch.randn(batch, d_in, generator=_gen(seed))
    return _finish(model), (x,)


def mlp_fx(
    seed: int = 0,
    batch: int = 8,
    d_in: int = 512,
    hidden: int = 2048,
    d_out: int = 512,
    layers: int = 2,
) -> tuple[torch.fx.GraphModule, dict[str, tuple[tuple[int, ...], str]]]:
    """The ``mlp`` model (same seed, same weights) as a ``torch.fx.GraphModule``.

    Returns ``(graph_module, {"x": ((batch, d_in), "float32")})``; the fx placeholder
    is named ``x``. Example inputs equal to ``mlp(...)[1]`` come from ``mlp``.
    """
    module, _ = mlp(seed, batch, d_in, hidden, d_out, layers)
    gm = torch.fx.symbolic_trace(module)
    return _finish(gm), {"x": ((batch, d_in), "float32")}


def export_onnx(
    module: nn.Module,
    args: tuple,
    input_names: list[str],
    output_names: list[str],
    opset: int = ONNX_OPSET,
) -> onnx.ModelProto:
    """Export ``module`` to an in-memory ONNX model with embedded weights (legacy exporter).

    The TorchScript-based exporter is used because it works offline with no extra
    packages (the dynamo exporter needs ``onnxscript``); shapes are static.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy exporter deprecation / tracer warnings
        torch.onnx.export(
            module,
            args,
            buf,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load_model_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    return model


def encoder_onnx(
    seed: int = 0,
    batch: int = 1,
    seq: int = 16,
    vocab: int = 128,
    d_model: int = 64,
    heads: int = 4,
    layers: int = 2,
    ffn: int = 256,
    num_classes: int | None = None,
) -> tuple[onnx.ModelProto, tuple[torch.Tensor]]:
    """``transformer_encoder`` exported to ONNX (opset 17) in memory.

    Input ``input_ids``: int64 (batch, seq); output ``output``. Weights are embedded.
    """
    module, inputs = transformer_encoder(
        seed, batch, seq, vocab, d_model, heads, layers, ffn, num_classes
    )
    model = export_onnx(module, inputs, [ENCODER_INPUT_NAME], [ENCODER_OUTPUT_NAME])
    return model, inputs


def _head(in_features: int, hidden: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def head_classes(head_seed: int) -> int:
    """Default output size of a shared-backbone head: 8, 10 or 12 depending on ``head_seed``."""
    return 8 + 2 * (head_seed % 3)


def shared_backbone_tenant(
    head_seed: int,
    backbone_seed: int = 0,
    batch: int = 1,
    image: int = 32,
    width: int = 16,
    hidden: int = 64,
    num_classes: int | None = None,
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A ResNet feature backbone (weights from ``backbone_seed``) + MLP head (from ``head_seed``).

    Calls with the same ``backbone_seed`` share bit-identical backbone weights and
    get equal example inputs (seeded by ``backbone_seed``). The head's output size is
    ``num_classes`` or, if None, ``head_classes(head_seed)``.
    """
    with seeded(backbone_seed):
        backbone = ResNetFeatures(width)
    classes = head_classes(head_seed) if num_classes is None else num_classes
    with seeded(10_007 + head_seed):  # a stream apart from any backbone seed
        head = _head(backbone.out_features, hidden, classes)
    x = torch.randn(batch, 3, image, image, generator=_gen(backbone_seed))
    return _finish(Classifier(backbone, head)), (x,)
