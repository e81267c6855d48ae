"""The Transformer's building blocks, in the paper's order: positional encoding, FFN, residual + LayerNorm,
the encoder layer and the decoder layer (sections 3.1, 3.3, 3.5).

Later models' departures are options of the same modules, chosen by the config: rotary positions (RoFormer)
instead of added encodings, RMSNorm instead of LayerNorm, a gated FFN (SwiGLU), grouped-query attention."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import AttentionCapture, MultiHeadAttention
from model.config import TransformerConfig
from model.fusion import fuse_linears

if TYPE_CHECKING:
    from model.attention import KVCache


def sinusoid_table(max_len: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (L, 1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return pe.float()  # (L, d_model)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal positional encoding (section 3.5), looked up by absolute position."""

    pe: Tensor

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoid_table(max_len, d_model), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.pe[positions]  # (B, T, d_model)


class LearnedPositions(nn.Module):
    """Learned positional embeddings (the paper's alternative, used by GPT-2)."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: Tensor) -> Tensor:
        return F.embedding(positions, self.weight)  # (B, T, d_model)


def rotary_frequencies(d_k: int, theta: float, scaling: dict[str, float | str] | None = None) -> Tensor:
    """theta^(-2i/d_k) for i < d_k/2, the angle per position of each pair of features; `scaling` stretches
    them for contexts longer than the training one ("linear": all by 1/factor; "llama3": low frequencies by
    1/factor, high ones kept, a smooth ramp between, as Meta's Llama 3.1 reference does)."""
    inv = 1.0 / (theta ** (torch.arange(0, d_k, 2, dtype=torch.int64).float() / d_k))  # (d_k/2,)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    assert scaling is not None
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        ramp = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, ramp, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


class RotaryPositions(nn.Module):
    """Rotary position embedding: each pair of a head's features is rotated by position x frequency, so q.k
    depends on the distance between positions. Returns (cos, sin), each (B, T, 1, d_k) in `dtype` (computed in
    float32, cast once for every layer), for attention's `apply_rotary`; sin carries rotate_half's sign."""

    inv_freq: Tensor
    sign: Tensor

    def __init__(self, d_k: int, theta: float, scaling: dict[str, float | str] | None = None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary_frequencies(d_k, theta, scaling), persistent=False)
        half = torch.ones(d_k // 2)
        self.register_buffer("sign", torch.cat((-half, half)), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        angles = positions[..., None].float() * self.inv_freq  # (B, T, d_k/2), in float32 whatever the model's dtype
        angles = torch.cat((angles, angles), dim=-1)[:, :, None]  # (B, T, 1, d_k): feature i pairs with i + d_k/2
        return angles.cos().to(dtype), (angles.sin() * self.sign).to(dtype)


def norm_layer(cfg: TransformerConfig) -> nn.Module:
    """LayerNorm (the paper, GPT-2) or RMSNorm (x / rms(x) * g: no mean, no bias; Llama)."""
    if cfg.norm_kind == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (ReLU, or GELU), with dropout on the activation; gated (Llama's
    SwiGLU with silu): FFN(x) = (act(x W_1) * x W_3) W_2."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.w_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.ffn == "gated" else None
        self.w_2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)
        self.w_13: nn.Module | None = None  # [W_1; W_3] as one matmul, once `fuse()` has run (serving)

    def fuse(self) -> None:
        """Serving: the gated FFN's x W_1 and x W_3 as one matmul over [W_1; W_3], split after (model/fusion.py);
        the same outputs. An ungated FFN has nothing to fuse."""
        if self.w_3 is not None and self.w_13 is None:
            self.w_13 = fuse_linears(self.w_1, self.w_3)

    def forward(self, x: Tensor) -> Tensor:
        if self.w_13 is not None:
            gate, up = self.w_13(x).chunk(2, dim=-1)  # x W_1, x W_3
            return self.w_2(self.dropout(self.act(gate) * up))
        hidden = self.act(self.w_1(x))  # (B, T, d_ff)
        if self.w_3 is not None:
            hidden = hidden * self.w_3(x)
        return self.w_2(self.dropout(hidden))


class Residual(nn.Module):
    """Residual + LayerNorm around a sub-layer: post-norm LayerNorm(x + Dropout(Sublayer(x))) as the paper,
    or pre-norm x + Dropout(Sublayer(LayerNorm(x))) as GPT-2 (stabler for deep stacks without warmup)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm = norm_layer(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.pre_norm = cfg.norm == "pre"

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each inside a residual + LayerNorm."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention.of(cfg, "encoder_self", layer_idx)
        self.ffn = FeedForward(cfg)
        self.res_attn, self.res_ffn = Residual(cfg), Residual(cfg)

    def forward(self, x: Tensor, mask: Tensor | None, capture: AttentionCapture | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.res_attn(x, lambda y: self.self_attn(y, mask=mask, capture=capture, rotary=rotary))
        return self.res_ffn(x, self.ffn)


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder (cross) attention when there is an encoder, then FFN."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention.of(cfg, "decoder_self", layer_idx)
        self.res_self = Residual(cfg)
        self.cross_attn: MultiHeadAttention | None = None
        if cfg.is_encoder_decoder:
            self.cross_attn = MultiHeadAttention.of(cfg, "cross", layer_idx)
            self.res_cross = Residual(cfg)
        self.ffn = FeedForward(cfg)
        self.res_ffn = Residual(cfg)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: KVCache | None = None,
        capture: AttentionCapture | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = self.res_self(x, lambda y: self.self_attn(y, mask=self_mask, cache=cache, capture=capture, rotary=rotary))
        if self.cross_attn is not None:
            cross = self.cross_attn
            x = self.res_cross(x, lambda y: cross(y, memory, mask=memory_mask, cache=cache, capture=capture))
        return self.res_ffn(x, self.ffn)
