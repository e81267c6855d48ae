"""The Transformer's building blocks, in the paper's order: positional encoding, FFN, residual + LayerNorm,
the encoder layer and the decoder layer (sections 3.1, 3.3, 3.5)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import AttentionCapture, MultiHeadAttention
from model.config import TransformerConfig

if TYPE_CHECKING:
    from model.kv_cache import KVCache


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


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (ReLU, or GELU), with dropout on the activation."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.w_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(self.act(self.w_1(x))))


class Residual(nn.Module):
    """Residual + LayerNorm around a sub-layer: post-norm LayerNorm(x + Dropout(Sublayer(x))) as the paper,
    or pre-norm x + Dropout(Sublayer(LayerNorm(x))) as GPT-2 (stabler for deep stacks without warmup)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
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
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.h, "encoder_self", layer_idx, cfg.attn_dropout, cfg.bias)
        self.ffn = FeedForward(cfg)
        self.res_attn, self.res_ffn = Residual(cfg), Residual(cfg)

    def forward(self, x: Tensor, mask: Tensor | None, capture: AttentionCapture | None = None) -> Tensor:
        x = self.res_attn(x, lambda y: self.self_attn(y, mask=mask, capture=capture))
        return self.res_ffn(x, self.ffn)


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder (cross) attention when there is an encoder, then FFN."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.h, "decoder_self", layer_idx, cfg.attn_dropout, cfg.bias)
        self.res_self = Residual(cfg)
        self.cross_attn: MultiHeadAttention | None = None
        if cfg.is_encoder_decoder:
            self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.h, "cross", layer_idx, cfg.attn_dropout, cfg.bias)
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
    ) -> Tensor:
        x = self.res_self(x, lambda y: self.self_attn(y, mask=self_mask, cache=cache, capture=capture))
        if self.cross_attn is not None:
            cross = self.cross_attn
            x = self.res_cross(x, lambda y: cross(y, memory, mask=memory_mask, cache=cache, capture=capture))
        return self.res_ffn(x, self.ffn)
