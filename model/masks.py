"""Attention masks. Boolean, broadcast to (B, h, T_q, T_k); True means "may attend" (torch SDPA's convention).

Imported by attention and by the KV caches; imports neither."""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> Tensor:
    """(T_q, T_k) lower-triangular mask; the queries are the last T_q of the T_k positions."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def padding_mask(key_valid: Tensor) -> Tensor:
    """(B, T_k) True-for-real-token -> (B, 1, 1, T_k), broadcast over heads and queries."""
    return key_valid[:, None, None, :]


def length_mask(lengths: Tensor, t_k: int) -> Tensor:
    """(B,) key counts -> (B, 1, 1, T_k): key j is visible to row b iff j < lengths[b]."""
    return padding_mask(torch.arange(t_k, device=lengths.device)[None, :] < lengths[:, None])


def span_mask(starts: Tensor, lengths: Tensor, t_k: int) -> Tensor:
    """(B,) first and end key -> (B, 1, 1, T_k): key j is visible to row b iff starts[b] <= j < lengths[b]."""
    j = torch.arange(t_k, device=lengths.device)[None, :]
    return padding_mask((j >= starts[:, None]) & (j < lengths[:, None]))


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of the masks that are present (causal and key padding combine this way)."""
    out: Tensor | None = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out
