"""The real-model zoo: architectures users bring, built from `transformers` configs.

Every entry builds a tiny config of a real architecture (2 layers, hidden 32-64) with
seeded random weights: nothing is downloaded. Scales that the library initialises to zero
or near zero (ConvNeXt's layer scale, a residual branch's last norm) and batch-norm
statistics get seeded random values, so that every output depends on every weight and a
numerics check compares something. Each model is wrapped to return its main tensor
(``last_hidden_state`` or ``logits``).

``REAL_ZOO``: name -> `ZooEntry` (family, builder); ``real_model(name)`` builds one:
``(module, example_inputs)``. ``real_zoo_tenants(names)`` makes tenants of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .zoo import _finish, _gen, seeded

SEQ = 16
VOCAB = 512
IMAGE = 32
AUDIO = 1600  # samples of raw audio (0.1 s at 16 kHz)

# one small transformer for every text and vision architecture, in each config's own names
_BERTLIKE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    vocab_size=VOCAB,
)
_DECODER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    vocab_size=VOCAB,
    use_cache=False,
)
_VIT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=IMAGE,
    patch_size=8,
    num_channels=3,
)


class MainOutput(nn.Module):
    """Calls a transformers model and returns its main tensor: ``logits`` when the model
    has a head, else ``last_hidden_state`` (a plain tensor output for every frontend)."""

    def __init__(self, model: nn.Module, key: str | None = None, **call_kwargs):
        super().__init__()
        self.model, self.key, self.call_kwargs = model, key, call_kwargs

    def forward(self, x):
        out = self.model(x, **self.call_kwargs)
        if self.key is not None:
            return out[self.key]
        for key in ("logits", "last_hidden_state"):
            if key in out:
                return out[key]
        return out[0]


@dataclass(frozen=True)
class ZooEntry:
    """One architecture: its family (encoder, decoder, vision, audio) and its builder."""

    family: str
    build: Callable[[], tuple[nn.Module, str]]  # -> (model, input kind)


def _randomize_degenerate(model: nn.Module, seed: int) -> None:
    """Seeded random values for the weights initialisation leaves (near) zero or constant
    where that hides work: scales ~0 (layer scale, zero-initialised norms), and batch-norm
    running statistics. Biases stay as they are (zero biases check nothing less)."""
    g = torch.Generator().manual_seed(seed + 77)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or p.numel() == 0:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_mean":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif leaf == "running_var":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif not leaf.endswith("bias") and p.abs().max() < 1e-3:
                # a scale initialised to ~0 (layer scale 1e-6, zero-init gamma)
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)


def _hf(config_cls: str, model_cls: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = getattr(transformers, config_cls)(**config)
            return getattr(transformers, model_cls)(cfg)

    return build


def _entry(
    family: str, kind: str, builder: Callable[[], nn.Module], key: str | None = None, **call_kwargs
) -> ZooEntry:
    def build():
        return MainOutput(builder(), key, **call_kwargs), kind

    return ZooEntry(family, build)


def _text(family, config_cls, model_cls, base=None, **config):
    return _entry(family, "ids", _hf(config_cls, model_cls, **{**(base or _BERTLIKE), **config}))


def _dec(config_cls, model_cls, **config):
    return _entry("decoder", "ids", _hf(config_cls, model_cls, **{**_DECODER, **config}))


def _vision(config_cls, model_cls, base=None, **config):
    return _entry("vision", "image", _hf(config_cls, model_cls, **{**(base or {}), **config}))


def _whisper_encoder() -> nn.Module:
    import transformers

    cfg = transformers.WhisperConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=16,
        max_source_positions=32,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        decoder_start_token_id=1,
    )
    return transformers.WhisperModel(cfg).get_encoder()


def _t5_encoder() -> nn.Module:
    import transformers

    cfg = transformers.T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=VOCAB, use_cache=False
    )
    return transformers.T5EncoderModel(cfg)


_AUDIO = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    conv_dim=(32, 32),
    conv_stride=(5, 4),
    conv_kernel=(10, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    do_stable_layer_norm=False,
    feat_extract_norm="group",
)
_CONVNEXT = dict(
    hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=IMAGE, num_labels=10
)
_RESNET = dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)

REAL_ZOO: dict[str, ZooEntry] = {
    # encoders
    "bert": _text("encoder", "BertConfig", "BertModel"),
    "distilbert": _text(
        "encoder",
        "DistilBertConfig",
        "DistilBertModel",
        base={},
        dim=64,
        n_layers=2,
        n_heads=4,
        hidden_dim=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    ),
    "roberta": _text("encoder", "RobertaConfig", "RobertaModel", max_position_embeddings=80),
    "albert": _text("encoder", "AlbertConfig", "AlbertModel", embedding_size=32),
    "electra": _text("encoder", "ElectraConfig", "ElectraModel", embedding_size=32),
    "mpnet": _text("encoder", "MPNetConfig", "MPNetModel"),
    "deberta_v2": _text("encoder", "DebertaV2Config", "DebertaV2Model"),
    "t5_encoder": _entry("encoder", "ids", _t5_encoder),
    "bert_eager": _entry(
        "encoder", "ids", _hf("BertConfig", "BertModel", **_BERTLIKE, attn_implementation="eager")
    ),
    # decoders (one forward pass, no KV cache)
    "gpt2": _dec(
        "GPT2Config",
        "GPT2Model",
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama": _dec("LlamaConfig", "LlamaModel", num_key_value_heads=2),
    "mistral": _dec("MistralConfig", "MistralModel", num_key_value_heads=2),
    "qwen2": _dec("Qwen2Config", "Qwen2Model", num_key_value_heads=2),
    "phi": _dec("PhiConfig", "PhiModel"),
    "gpt_neox": _dec("GPTNeoXConfig", "GPTNeoXModel"),
    "opt": _dec("OPTConfig", "OPTModel", ffn_dim=128, word_embed_proj_dim=64),
    "gemma": _dec("GemmaConfig", "GemmaModel", num_key_value_heads=2, head_dim=16),
    "llama_eager": _entry(
        "decoder",
        "ids",
        _hf(
            "LlamaConfig",
            "LlamaModel",
            **_DECODER,
            num_key_value_heads=2,
            attn_implementation="eager",
        ),
    ),
    # vision
    "vit": _vision("ViTConfig", "ViTModel", _VIT),
    "deit": _vision("DeiTConfig", "DeiTModel", _VIT),
    "beit": _vision("BeitConfig", "BeitModel", _VIT),
    "dinov2": _vision("Dinov2Config", "Dinov2Model", _VIT),
    "convnext": _vision("ConvNextConfig", "ConvNextForImageClassification", _CONVNEXT),
    "convnextv2": _vision("ConvNextV2Config", "ConvNextV2ForImageClassification", _CONVNEXT),
    "mobilevit": _vision(
        "MobileViTConfig",
        "MobileViTModel",
        image_size=IMAGE,
        hidden_sizes=[32, 40, 48],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=2,
        initializer_range=0.15,
        num_labels=10,
    ),
    "resnet": _vision("ResNetConfig", "ResNetForImageClassification", _RESNET),
    "regnet": _vision(
        "RegNetConfig",
        "RegNetForImageClassification",
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        groups_width=8,
        num_labels=10,
    ),
    "swin": _vision(
        "SwinConfig",
        "SwinModel",
        image_size=IMAGE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
    ),
    "mobilenet_v2": _vision(
        "MobileNetV2Config",
        "MobileNetV2ForImageClassification",
        image_size=IMAGE,
        depth_multiplier=0.35,
        num_labels=10,
    ),
    # audio
    "whisper_encoder": _entry("audio", "mel", _whisper_encoder),
    "wav2vec2": _entry("audio", "wave", _hf("Wav2Vec2Config", "Wav2Vec2Model", **_AUDIO)),
    "hubert": _entry("audio", "wave", _hf("HubertConfig", "HubertModel", **_AUDIO)),
    "wavlm": _entry(
        "audio",
        "wave",
        _hf("WavLMConfig", "WavLMModel", **_AUDIO, num_buckets=16, max_bucket_distance=32),
    ),
}


def example_input(kind: str, seed: int, batch: int = 1) -> torch.Tensor:
    """A seeded example input of the given kind (token ids, image, mel frames, waveform)."""
    g = _gen(seed)
    if kind == "ids":
        return torch.randint(0, VOCAB, (batch, SEQ), generator=g, dtype=torch.int64)
    if kind == "image":
        return torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
    if kind == "mel":
        return torch.randn(batch, 16, 64, generator=g)  # (batch, mel bins, 2 x positions)
    if kind == "wave":
        return torch.randn(batch, AUDIO, generator=g)
    raise ValueError(f"unknown input kind {kind!r}")


def real_model(name: str, seed: int = 0, batch: int = 1) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The zoo's model `name` (seeded weights, eval mode) and its example inputs."""
    if name not in REAL_ZOO:
        raise KeyError(f"no zoo model {name!r}; known: {sorted(REAL_ZOO)}")
    with seeded(seed):
        model, kind = REAL_ZOO[name].build()
    _randomize_degenerate(model, seed)
    return _finish(model), (example_input(kind, seed, batch),)


def real_zoo_tenants(names=None, seed: int = 0, batch: int = 1) -> list:
    """Tenants of the zoo models `names` (all by default), each under its zoo name."""
    from mtcompile.tenant import Tenant

    out = []
    for i, name in enumerate(names or REAL_ZOO):
        model, inputs = real_model(name, seed + i, batch)
        out.append(Tenant(name, model, example_inputs=inputs))
    return out


def real_onnx(name: str, seed: int = 0, batch: int = 1):
    """The zoo's model `name` exported to ONNX: ``(onnx.ModelProto, (x,))``.

    Exported in memory by torch.onnx's dynamo exporter at opset 18, with the weights
    embedded as initializers and static shapes (those of `x`, from `real_model` with the
    same `seed` and `batch`); its warnings and progress lines are silenced. ``x`` is the
    example input as a CPU torch tensor (``x.numpy()`` for onnxruntime or a bundle)."""
    import contextlib
    import io
    import logging

    model, (x,) = real_model(name, seed, batch)
    loggers = [
        logging.getLogger(n)
        for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    ]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=18,
                external_data=False,
                verbose=False,
                report=False,
                optimize=True,
            )
    except Exception as e:
        raise RuntimeError(
            f"zoo model {name!r}: torch.onnx.export failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return program.model_proto, (x,)
