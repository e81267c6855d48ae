"""`TransformerConfig`: the architecture, saved inside every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Arch = Literal["encoder-decoder", "decoder-only"]
Norm = Literal["post", "pre"]
NormKind = Literal["layernorm", "rmsnorm"]
Positional = Literal["sinusoidal", "learned", "rotary"]
Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
FFNKind = Literal["plain", "gated"]
RopeScaling = tuple[tuple[str, float | str], ...]  # a checkpoint's rope_scaling dict as sorted pairs (hashable)


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
    # Departures of later models from the paper, each off by default (the paper's model is the default):
    norm_kind: NormKind = "layernorm"  # RMSNorm (Zhang & Sennrich 2019): no centring, no bias (Llama)
    rope_theta: float = 10000.0  # rotary positions (Su et al. 2021): the base of the rotation frequencies
    rope_scaling: RopeScaling | None = None  # ("rope_type", "linear" | "llama3"), ("factor", 8.0), ...
    ffn: FFNKind = "plain"  # "gated": FFN(x) = (act(x W_1) * x W_3) W_2 (Shazeer 2020; SwiGLU with silu)
    n_kv_heads: int | None = None  # grouped-query attention (Ainslie et al. 2023): K/V heads shared by groups
    qkv_bias: bool | None = None  # biases on the Q/K/V projections only (Qwen2); None follows `bias`
    layer_norm_eps: float = 1e-5
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (section 3.4)
    share_embeddings: bool = False  # one matrix for source and target embeddings (shared BPE vocabulary)
    tie_embeddings: bool = True  # the pre-softmax linear reuses the target embedding matrix

    def __post_init__(self) -> None:
        if self.d_model % self.h != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by h ({self.h})")
        if self.arch not in ("encoder-decoder", "decoder-only"):
            raise ValueError(f"unknown arch {self.arch!r}")
        if self.h % self.kv_heads != 0:
            raise ValueError(f"h ({self.h}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.positional == "rotary" and self.d_k % 2:
            raise ValueError(f"rotary positions need an even head size (d_k = {self.d_k})")

    @property
    def d_k(self) -> int:
        return self.d_model // self.h

    @property
    def kv_heads(self) -> int:
        """Heads of K/V: h (the paper's multi-head attention) unless grouped-query attention shares them."""
        return self.n_kv_heads or self.h

    @property
    def is_encoder_decoder(self) -> bool:
        return self.arch == "encoder-decoder"

    @property
    def final_norm(self) -> bool:
        """Pre-norm stacks end with a LayerNorm (GPT-2's ln_f); the paper's post-norm stacks do not."""
        return self.norm == "pre"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        if d.get("rope_scaling") is not None:  # JSON turns the pairs into lists
            d = {**d, "rope_scaling": tuple(tuple(p) for p in d["rope_scaling"])}
        return cls(**d)


def preset(name: str, **overrides: Any) -> TransformerConfig:
    """Named configurations: the paper's base model, nanoGPT's char model, GPT-2 small, SmolLM2-135M's Llama shape,
    and tiny test sizes."""
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
        # A Llama-shaped decoder (RMSNorm, rotary, SwiGLU, grouped-query attention): SmolLM2-135M's layout.
        "smollm2-135m": dict(
            arch="decoder-only", vocab_size=49152, d_model=576, h=9, n_kv_heads=3, d_ff=1536, n_decoder_layers=30,
            max_len=8192, norm="pre", norm_kind="rmsnorm", positional="rotary", rope_theta=100000.0,
            activation="silu", ffn="gated", bias=False, layer_norm_eps=1e-5, scale_embeddings=False,
            tie_embeddings=True, dropout=0.0, attn_dropout=0.0, n_encoder_layers=0,
        ),
        "tiny-llama": dict(
            arch="decoder-only", vocab_size=64, d_model=32, h=4, n_kv_heads=2, d_ff=64, n_decoder_layers=2,
            max_len=64, norm="pre", norm_kind="rmsnorm", positional="rotary", activation="silu", ffn="gated",
            bias=False, scale_embeddings=False, tie_embeddings=False, dropout=0.0, attn_dropout=0.0,
        ),
        "tiny-seq2seq": dict(
            arch="encoder-decoder", vocab_size=64, d_model=32, h=4, d_ff=64, n_encoder_layers=2,
            n_decoder_layers=2, max_len=64, dropout=0.0, attn_dropout=0.0,
        ),
    }
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(presets)}")
    return TransformerConfig(**{**presets[name], **overrides})
