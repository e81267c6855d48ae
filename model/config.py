"""`TransformerConfig`: the architecture, saved inside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Arch = Literal["encoder-decoder", "decoder-only"]
Norm = Literal["post", "pre"]
Positional = Literal["sinusoidal", "learned"]
Activation = Literal["relu", "gelu", "gelu_tanh"]


@dataclass(frozen=True)
class TransformerConfig:
    """Everything needed to rebuild the network; the paper's names (d_model, h, d_ff, N)."""

    arch: Arch = "encoder-decoder"
    vocab_size: int = 37000
    src_vocab_size: int | None = None  # encoder-decoder only; None means the shared vocabulary
    d_model: int = 512
    h: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6  # N in the paper; ignored by decoder-only models
    n_decoder_layers: int = 6
    dropout: float = 0.1  # P_drop: embeddings + PE, each sub-layer output, FFN activation
    attn_dropout: float = 0.1  # on the softmax weights
    max_len: int = 512
    norm: Norm = "post"  # "post": LayerNorm(x + SubLayer(x)) as the paper; "pre": x + SubLayer(LayerNorm(x)) as GPT-2
    positional: Positional = "sinusoidal"
    activation: Activation = "relu"
    bias: bool = True
    layer_norm_eps: float = 1e-5
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (section 3.4)
    share_embeddings: bool = False  # one matrix for source and target embeddings (shared BPE vocabulary)
    tie_embeddings: bool = True  # the pre-softmax linear reuses the target embedding matrix

    def __post_init__(self) -> None:
        if self.d_model % self.h != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by h ({self.h})")
        if self.arch not in ("encoder-decoder", "decoder-only"):
            raise ValueError(f"unknown arch {self.arch!r}")

    @property
    def d_k(self) -> int:
        return self.d_model // self.h

    @property
    def is_encoder_decoder(self) -> bool:
        return self.arch == "encoder-decoder"

    @property
    def final_norm(self) -> bool:
        """Pre-norm stacks end with a LayerNorm (GPT-2's ln_f); the paper's post-norm stacks do not."""
        return self.norm == "pre"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)


def preset(name: str, **overrides: Any) -> TransformerConfig:
    """Named configurations: the paper's base model, nanoGPT's char model, GPT-2 small, and tiny test sizes."""
    presets: dict[str, dict[str, Any]] = {
        "transformer-base": dict(arch="encoder-decoder", d_model=512, h=8, d_ff=2048, dropout=0.1),
        "transformer-big": dict(arch="encoder-decoder", d_model=1024, h=16, d_ff=4096, dropout=0.3),
        "gpt-char": dict(
            arch="decoder-only", vocab_size=65, d_model=384, h=6, d_ff=1536, n_decoder_layers=6, max_len=256,
            norm="pre", positional="learned", activation="gelu", scale_embeddings=False, dropout=0.2,
            attn_dropout=0.2,
        ),
        "gpt2-small": dict(
            arch="decoder-only", vocab_size=50257, d_model=768, h=12, d_ff=3072, n_decoder_layers=12,
            max_len=1024, norm="pre", positional="learned", activation="gelu_tanh", scale_embeddings=False,
            dropout=0.1, attn_dropout=0.1,
        ),
        "tiny-gpt": dict(
            arch="decoder-only", vocab_size=64, d_model=32, h=4, d_ff=64, n_decoder_layers=2, max_len=64,
            norm="pre", positional="learned", activation="gelu", scale_embeddings=False, dropout=0.0,
            attn_dropout=0.0,
        ),
        "tiny-seq2seq": dict(
            arch="encoder-decoder", vocab_size=64, d_model=32, h=4, d_ff=64, n_encoder_layers=2,
            n_decoder_layers=2, max_len=64, dropout=0.0, attn_dropout=0.0,
        ),
    }
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(presets)}")
    return TransformerConfig(**{**presets[name], **overrides})
