"""The zoo's network modules: small, importer-friendly building blocks.

Everything is written with plain ops (conv, matmul, softmax, layer_norm) so that
torch.export, torch.fx and the ONNX exporter all see the same simple graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def randomize_bn(bn: nn.BatchNorm2d) -> None:
    """Give a BatchNorm non-trivial affine params and running stats (uses the global RNG)."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm with randomized statistics."""
    bn = nn.BatchNorm2d(c_out)
    randomize_bn(bn)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, bn)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body1 = conv_bn(c_in, c_out, 3, stride)
        self.body2 = conv_bn(c_out, c_out, 3)
        self.relu = nn.ReLU()
        self.downsample = (
            conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.body1(x))
        out = self.body2(out)
        return self.relu(out + self.downsample(x))


class ResNetFeatures(nn.Module):
    """Stem conv+BN+ReLU, three basic blocks (the second with stride 2), global avg pool."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = conv_bn(3, width, 3)
        self.relu = nn.ReLU()
        self.blocks = nn.Sequential(
            BasicBlock(width, width),
            BasicBlock(width, 2 * width, stride=2),
            BasicBlock(2 * width, 2 * width),
        )
        self.out_features = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.relu(self.stem(x)))
        return torch.flatten(x.mean(dim=(2, 3)), 1)


class Classifier(nn.Module):
    """A feature extractor followed by a head."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with hand-written attention (no fused kernels)."""

    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, d_model // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.norm1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn1 = nn.Linear(d_model, ffn)
        self.act = nn.GELU()
        self.ffn2 = nn.Linear(ffn, d_model)

    def _split(self, x: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        return x.reshape(batch, seq, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        h = self.norm1(x)
        q = self._split(self.q(h), batch, seq)
        k = self._split(self.k(h), batch, seq)
        v = self._split(self.v(h), batch, seq)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.matmul(torch.softmax(scores, dim=-1), v)
        attn = attn.permute(0, 2, 1, 3).reshape(batch, seq, d_model)
        x = x + self.out(attn)
        return x + self.ffn2(self.act(self.ffn1(self.norm2(x))))


class TransformerEncoder(nn.Module):
    """Token + learned positional embedding, N encoder layers, final LayerNorm.

    Returns hidden states (batch, seq, d_model), or mean-pooled logits when a
    classifier head is present.
    """

    def __init__(
        self,
        vocab: int,
        seq: int,
        d_model: int,
        heads: int,
        layers: int,
        ffn: int,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(1, seq, d_model) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.classifier = nn.Linear(d_model, num_classes) if num_classes else None
        with torch.no_grad():  # non-trivial LayerNorm affine params
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.8, 1.2)
                    m.bias.normal_(0.0, 0.05)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids) + self.pos
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        if self.classifier is None:
            return x
        return self.classifier(x.mean(dim=1))


class MLP(nn.Module):
    """Linear/ReLU stack: ``layers`` Linear layers, ReLU between them."""

    def __init__(self, d_in: int, hidden: int, d_out: int, layers: int):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        dims = [d_in] + [hidden] * (layers - 1) + [d_out]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.ReLU())
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViT(nn.Module):
    """Vision transformer: conv patch embedding, class token, learned positions,
    pre-norm encoder layers, final LayerNorm, linear head on the class token."""

    def __init__(
        self,
        image: int,
        patch: int,
        d_model: int,
        heads: int,
        layers: int,
        ffn: int,
        num_classes: int,
    ):
        super().__init__()
        if image % patch:
            raise ValueError(f"image={image} is not divisible by patch={patch}")
        tokens = (image // patch) ** 2 + 1
        self.patch = nn.Conv2d(3, d_model, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, tokens, d_model) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.patch(x), 2).transpose(1, 2)  # (batch, patches, d_model)
        cls = self.cls.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])
