"""KV caches: attention layers hand this step's keys/values to the cache and get back what to attend over.

Two implementations of one interface:
- `ContiguousKVCache`: preallocated per-sequence buffers for a few sequences that advance together (the
  reference decoder, beam search); written in place, nothing concatenated per step.
- `PagedKVCache`: one step's view of a `BlockPool` shared by many requests; each request owns a block table,
  so requests of any length share one preallocated pool (vLLM's PagedAttention layout, gathered for SDPA).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from model.attention import causal_mask
from model.config import TransformerConfig

KVProjector = Callable[[], tuple[Tensor, Tensor]]


class KVCache(ABC):
    """The contract between an attention layer and whatever keeps its keys and values."""

    @abstractmethod
    def self_attention(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store this step's k, v (B, h, T_new, d_k); return K, V (B, h, T_k, d_k) to attend over and the mask."""

    @abstractmethod
    def cross_attention(self, layer: int, project: KVProjector) -> tuple[Tensor, Tensor, Tensor | None]:
        """Return the encoder memory's K, V for this layer (computed by `project` once per sequence) and mask."""


class ContiguousKVCache(KVCache):
    """Preallocated (B, h, max_len, d_k) buffers per layer for B sequences decoded in lockstep."""

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
        shape = (cfg.n_decoder_layers, batch_size, cfg.h, max_len, cfg.d_k)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * cfg.n_decoder_layers
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}
        self.memory_mask = memory_valid[:, None, None, :] if memory_valid is not None else None

    @property
    def length(self) -> int:
        """Tokens stored so far (the position of the next token)."""
        return self.lengths[-1]

    def self_attention(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        start, t = self.lengths[layer], k.size(2)
        end = start + t
        if end > self.k.size(3):
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.k.size(3)}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        self.lengths[layer] = end
        mask = None if t == 1 else causal_mask(t, end, k.device)  # (T_new, T_k)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask

    def cross_attention(self, layer: int, project: KVProjector) -> tuple[Tensor, Tensor, Tensor | None]:
        if layer not in self.cross:
            self.cross[layer] = project()
        k, v = self.cross[layer]
        return k, v, self.memory_mask

    def reorder(self, index: Tensor) -> None:
        """Keep sequences `index` (beam search): row i of the cache becomes old row index[i]."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.cross = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross.items()}
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)


class BlockPool:
    """The preallocated K/V memory of a serving engine: per layer, num_blocks * block_size slots of (h, d_k).

    A token's K/V lives at slot `block * block_size + offset`; which blocks a request owns is decided outside
    (the scheduler's block manager), so this class is only memory plus the arithmetic of its size."""

    def __init__(
        self,
        cfg: TransformerConfig,
        num_blocks: int,
        block_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (cfg.n_decoder_layers, num_blocks * block_size, cfg.h, cfg.d_k)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_block(cfg: TransformerConfig, block_size: int, dtype: torch.dtype) -> int:
        """K and V of every decoder layer for block_size tokens."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_decoder_layers * block_size * cfg.d_model * itemsize

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v (N, h, d_k) go to `slots` (N,) in place."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """slots (B, L) -> K, V (B, h, L, d_k)."""
        b, n = slots.shape
        flat = slots.reshape(-1)  # index_select on one dim is ~2.5x faster than advanced indexing on CPU
        k = self.k[layer].index_select(0, flat).view(b, n, *self.k.shape[2:])  # (B, L, h, d_k)
        v = self.v[layer].index_select(0, flat).view(b, n, *self.v.shape[2:])
        return k.transpose(1, 2), v.transpose(1, 2)


class PagedKVCache(KVCache):
    """One engine step's view of a `BlockPool` for a batch of B requests with T_new query tokens each (padded).

    write_slots (N,): slot of each real new token, in row-major (B, T_new) order of `write_rows`;
    write_rows (N,) | None: which flattened (B * T_new) rows are real tokens (None: all of them);
    read_slots (B, L): the slots each request attends over (padding points at any valid slot);
    mask (B, 1, T_new, L): causality within the step and the padding of shorter requests;
    cross_slots (B, S) / cross_mask (B, 1, 1, S): where each request's encoder K/V were written at prefill."""

    def __init__(
        self,
        pool: BlockPool,
        write_slots: Tensor,
        write_rows: Tensor | None,
        read_slots: Tensor,
        mask: Tensor | None,
        cross_slots: Tensor | None = None,
        cross_mask: Tensor | None = None,
    ) -> None:
        self.pool = pool
        self.write_slots, self.write_rows = write_slots, write_rows
        self.read_slots, self.mask = read_slots, mask
        self.cross_slots, self.cross_mask = cross_slots, cross_mask

    def self_attention(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        b, h, t, d_k = k.shape
        k_new = k.transpose(1, 2).reshape(b * t, h, d_k)  # (B*T_new, h, d_k)
        v_new = v.transpose(1, 2).reshape(b * t, h, d_k)
        if self.write_rows is not None:
            k_new, v_new = k_new[self.write_rows], v_new[self.write_rows]
        self.pool.write(layer, self.write_slots, k_new, v_new)
        k_all, v_all = self.pool.gather(layer, self.read_slots)
        return k_all, v_all, self.mask

    def cross_attention(self, layer: int, project: KVProjector) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.cross_slots is None:
            raise RuntimeError("cross-attention K/V were not written for this batch")
        k, v = self.pool.gather(layer, self.cross_slots)
        return k, v, self.cross_mask
