"""Scaled dot-product attention and multi-head attention (section 3.2), with masks and weight capture.

Masks are boolean and broadcast to (B, h, T_q, T_k); True means "may attend" (torch SDPA's convention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from model.kv_cache import KVCache

KINDS = ("encoder_self", "decoder_self", "cross")


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> Tensor:
    """(T_q, T_k) lower-triangular mask; the queries are the last T_q of the T_k positions."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def padding_mask(key_valid: Tensor) -> Tensor:
    """(B, T_k) True-for-real-token -> (B, 1, 1, T_k), broadcast over heads and queries."""
    return key_valid[:, None, None, :]


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of the masks that are present (causal and key padding combine this way)."""
    out: Tensor | None = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)) with masked cells exactly 0; a fully masked row is all zeros, never NaN."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, h, T_q, T_k)
    if mask is None:
        return scores.float().softmax(dim=-1).to(q.dtype)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    return weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Fast path: torch SDPA (fused kernels, weights never materialized). q (B,h,T_q,d_k), k/v (B,h,T_k,d_k)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    # Rows with no visible key (e.g. padded queries) must be 0, as in the explicit path.
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


class AttentionCapture:
    """Collects softmax weights per (kind, layer) during one forward; pass it to `forward(capture=...)`."""

    def __init__(self, kinds: Iterable[str] | None = None, layers: Iterable[int] | None = None) -> None:
        self.kinds = set(kinds) if kinds is not None else set(KINDS)
        self.layers = set(layers) if layers is not None else None
        self.weights: dict[tuple[str, int], Tensor] = {}

    def wants(self, kind: str, layer: int) -> bool:
        return kind in self.kinds and (self.layers is None or layer in self.layers)

    def record(self, kind: str, layer: int, weights: Tensor) -> None:
        self.weights[(kind, layer)] = weights.detach()  # (B, h, T_q, T_k)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W_O with head_i = Attention(Q W_Q_i, K W_K_i, V W_V_i)."""

    def __init__(
        self, d_model: int, h: int, kind: str, layer_idx: int, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        assert kind in KINDS, kind
        self.h, self.d_k = h, d_model // h
        self.kind, self.layer_idx = kind, layer_idx
        self.w_q = nn.Linear(d_model, d_model, bias=bias)
        self.w_k = nn.Linear(d_model, d_model, bias=bias)
        self.w_v = nn.Linear(d_model, d_model, bias=bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.d_k).transpose(1, 2)  # (B, h, T, d_k)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.w_k(x)), self.split_heads(self.w_v(x))

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        capture: AttentionCapture | None = None,
    ) -> Tensor:
        """x (B, T_q, d_model); memory (B, T_k, d_model) for cross-attention. With a cache, the cache supplies
        the keys/values to attend over and their mask (causality and padding included)."""
        q = self.split_heads(self.w_q(x))  # (B, h, T_q, d_k)
        if self.kind == "cross":
            def kv() -> tuple[Tensor, Tensor]:  # a cache may hold these already (never called then)
                if memory is None:
                    raise ValueError("cross-attention needs the encoder memory")
                return self.project_kv(memory)
            if cache is not None:
                k, v, mask = cache.cross_attention(self.layer_idx, kv)
            else:
                k, v = kv()
        else:
            k, v = self.project_kv(x)  # (B, h, T_new, d_k)
            if cache is not None:
                k, v, mask = cache.self_attention(self.layer_idx, k, v)
        p = self.dropout if self.training else 0.0
        if capture is not None and capture.wants(self.kind, self.layer_idx):
            weights = attention_weights(q, k, mask)  # (B, h, T_q, T_k)
            capture.record(self.kind, self.layer_idx, weights)
            out = F.dropout(weights, p) @ v
        else:
            out = scaled_dot_product_attention(q, k, v, mask, p)
        b, _, t, _ = out.shape
        return self.w_o(out.transpose(1, 2).reshape(b, t, self.h * self.d_k))  # (B, T_q, d_model)
