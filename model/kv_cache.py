"""The contiguous KV cache of the reference decoder (the contract, `KVCache`, is model/attention.py's).

An attention layer hands the cache this step's queries, keys and values; the cache stores the keys and values
and returns the attention output over everything it holds, with its own masks and memory layout. Two
implementations: `ContiguousKVCache` here (a few sequences decoded in lockstep: the reference decoder, beam
search) and `PagedKVCache` in model/paged_cache.py (one serving step over many requests)."""

from __future__ import annotations

import torch
from torch import Tensor

from model.attention import AttentionCapture, KVProjector, attend
from model.config import TransformerConfig
from model.masks import causal_mask


class ContiguousKVCache:
    """Preallocated (B, h_kv, max_len, d_k) buffers per layer for B sequences decoded in lockstep; written in place."""

    def __init__(
        self,
        cfg: TransformerConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        memory_valid: Tensor | None = None,
    ) -> None:
        max_len = max_len or cfg.max_len
        shape = (cfg.n_decoder_layers, batch_size, cfg.kv_heads, max_len, cfg.d_k)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * cfg.n_decoder_layers
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}
        self.memory_mask = memory_valid[:, None, None, :] if memory_valid is not None else None

    @property
    def length(self) -> int:
        """Tokens stored so far (the position of the next token)."""
        return self.lengths[-1]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, capture: AttentionCapture | None) -> Tensor:
        start, t = self.lengths[layer], k.size(1)
        end = start + t
        if end > self.k.size(3):
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.k.size(3)}")
        self.k[layer, :, :, start:end] = k.transpose(1, 2)
        self.v[layer, :, :, start:end] = v.transpose(1, 2)
        self.lengths[layer] = end
        mask = None if t == 1 else causal_mask(t, end, k.device)  # (T_new, T_k)
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, h_kv, T_k, d_k)
        return attend(q.transpose(1, 2), keys, values, mask, "decoder_self", layer, capture).transpose(1, 2)

    def attend_cross(self, layer: int, q: Tensor, project: KVProjector, capture: AttentionCapture | None) -> Tensor:
        if layer not in self.cross:
            self.cross[layer] = project()
        k, v = self.cross[layer]  # (B, h, S, d_k)
        return attend(q.transpose(1, 2), k, v, self.memory_mask, "cross", layer, capture).transpose(1, 2)

    def reorder(self, index: Tensor) -> None:
        """Keep sequences `index` (beam search): row i of the cache becomes old row index[i]."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.cross = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross.items()}
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)
