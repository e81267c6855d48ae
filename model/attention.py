"""Scaled dot-product attention and multi-head attention (section 3.2), with weight capture.

Two paths compute the same thing: the fast path (torch SDPA, fused kernels, weights never materialized) and the
explicit path (softmax(QK^T / sqrt(d_k)) V written out), which also hands the weights to an `AttentionCapture`.
Masks are boolean (model/masks.py); True means "may attend"."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from model.fusion import fuse_linears

if TYPE_CHECKING:
    from model.config import TransformerConfig

KINDS = ("encoder_self", "decoder_self", "cross")

KVProjector = Callable[[], tuple[Tensor, Tensor]]


class KVCache(Protocol):
    """What an attention layer needs from whatever keeps its keys and values."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, capture: AttentionCapture | None) -> Tensor:
        """Store this step's k, v and attend q over the cached sequence. q, result: (B, T_new, h, d_k); k, v:
        (B, T_new, h_kv, d_k), h_kv dividing h (grouped-query attention)."""
        ...

    def attend_cross(self, layer: int, q: Tensor, project: KVProjector, capture: AttentionCapture | None) -> Tensor:
        """Attend q (B, T_new, h, d_k) over the encoder memory's K/V (computed by `project` once per sequence)."""
        ...


def share_kv(k: Tensor, h: int) -> Tensor:
    """Grouped-query attention's K or V (B, h_kv, T, d_k) as (B, h, T, d_k): query head i reads K/V head
    i // (h / h_kv), as each group of h / h_kv consecutive query heads shares one."""
    return k if k.size(1) == h else k.repeat_interleave(h // k.size(1), dim=1)


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
    """Fast path: torch SDPA. q (B,h,T_q,d_k), k/v (B,h,T_k,d_k); rows with no visible key are 0."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
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


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, kind: str, layer: int,
    capture: AttentionCapture | None = None, dropout_p: float = 0.0,
) -> Tensor:
    """Attention(Q, K, V) on (B, h, T, d_k) tensors (K/V may have fewer, shared heads): the explicit path when
    `capture` wants this layer's weights, else the fast path. Returns (B, h, T_q, d_k)."""
    k, v = share_kv(k, q.size(1)), share_kv(v, q.size(1))
    if capture is not None and capture.wants(kind, layer):
        weights = attention_weights(q, k, mask)  # (B, h, T_q, T_k)
        capture.record(kind, layer, weights)
        return F.dropout(weights, dropout_p) @ v
    return scaled_dot_product_attention(q, k, v, mask, dropout_p)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W_O with head_i = Attention(Q W_Q_i, K W_K_i, V W_V_i).
    With `n_kv_heads` < h, groups of query heads share K/V heads (grouped-query attention; 1 = multi-query)."""

    def __init__(
        self, d_model: int, h: int, kind: str, layer_idx: int, dropout: float = 0.0, bias: bool = True,
        n_kv_heads: int | None = None, qkv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        assert kind in KINDS, kind
        self.h, self.d_k = h, d_model // h
        self.h_kv = n_kv_heads or h
        self.kind, self.layer_idx = kind, layer_idx
        in_bias = bias if qkv_bias is None else qkv_bias
        self.w_q = nn.Linear(d_model, d_model, bias=in_bias)
        self.w_k = nn.Linear(d_model, self.h_kv * self.d_k, bias=in_bias)
        self.w_v = nn.Linear(d_model, self.h_kv * self.d_k, bias=in_bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.w_qkv: nn.Module | None = None  # [W_Q; W_K; W_V] as one matmul, once `fuse()` has run (serving)

    @classmethod
    def of(cls, cfg: TransformerConfig, kind: str, layer_idx: int) -> MultiHeadAttention:
        """The attention sub-layer the config describes (cross-attention never shares K/V heads)."""
        kv = cfg.n_kv_heads if kind != "cross" else None
        return cls(cfg.d_model, cfg.h, kind, layer_idx, cfg.attn_dropout, cfg.bias, kv, cfg.qkv_bias)

    def fuse(self) -> None:
        """Serving: self-attention's Q, K and V projections as one matmul over the stacked weights
        [W_Q; W_K; W_V] ((h + 2 h_kv) d_k rows), split after (model/fusion.py). The same outputs; w_q, w_k and
        w_v then read rows of the stacked weight. Cross-attention projects K/V from other input: not fused."""
        if self.kind != "cross" and self.w_qkv is None:
            self.w_qkv = fuse_linears(self.w_q, self.w_k, self.w_v)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x W_Q, x W_K, x W_V for x (B, T, d_model): (B, T, h d_k), (B, T, h_kv d_k), (B, T, h_kv d_k)."""
        if self.w_qkv is None:
            return self.w_q(x), self.w_k(x), self.w_v(x)
        q, k, v = self.w_qkv(x).split([self.h * self.d_k, self.h_kv * self.d_k, self.h_kv * self.d_k], dim=-1)
        return q, k, v

    def heads(self, x: Tensor, n: int | None = None) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n or self.h, self.d_k)  # (B, T, heads, d_k): a view, no copy

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of x (B, T, d_model) as (B, h_kv, T, d_k)."""
        return self.heads(self.w_k(x), self.h_kv).transpose(1, 2), self.heads(self.w_v(x), self.h_kv).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        capture: AttentionCapture | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x (B, T_q, d_model); memory (B, T_k, d_model) for cross-attention; `rotary` the (cos, sin) of x's
        positions when positions are rotary (applied to q and k before the cache stores k). With a cache, the
        cache stores this step's keys/values and attends over everything it holds (its own masks and layout)."""
        b, t, _ = x.shape
        if self.kind == "cross":
            q = self.heads(self.w_q(x))  # (B, T_q, h, d_k)
            if cache is not None:
                out = cache.attend_cross(self.layer_idx, q, lambda: self.project_kv(_need(memory)), capture)
                return self.w_o(out.reshape(b, t, self.h * self.d_k))  # (B, T_q, d_model)
            k, v = self.project_kv(_need(memory))  # (B, h_kv, T_k, d_k)
        else:
            q, k, v = self.project_qkv(x)
            q, k, v = self.heads(q), self.heads(k, self.h_kv), self.heads(v, self.h_kv)  # (B, T, h or h_kv, d_k)
            if rotary is not None:
                q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
            if cache is not None:
                out = cache.attend(self.layer_idx, q, k, v, capture)  # (B, T_q, h, d_k)
                return self.w_o(out.reshape(b, t, self.h * self.d_k))
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, h_kv, T_k, d_k)
        p = self.dropout if self.training else 0.0
        out = attend(q.transpose(1, 2), k, v, mask, self.kind, self.layer_idx, capture, p)  # (B, h, T_q, d_k)
        return self.w_o(out.transpose(1, 2).reshape(b, t, self.h * self.d_k))  # (B, T_q, d_model)


def apply_rotary(x: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate x (B, T, heads, d_k) by its positions' angles (RoFormer): x cos + rotate_half(x) sin, where
    rotate_half(x) = (-x2, x1) pairs feature i with i + d_k/2 (the Hugging Face Llama layout). `rotary` comes from
    RotaryPositions: (cos, sin) in x's dtype, sin's first half negated, so rotate_half(x) sin = (x2, x1) sin."""
    cos, sin = rotary  # (B, T, 1, d_k)
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


def _need(memory: Tensor | None) -> Tensor:
    if memory is None:
        raise ValueError("cross-attention needs the encoder memory")
    return memory
