"""The serving engine's KV memory (`BlockPool`) and one step's ragged view of it (`PagedKVCache`).

The pool is paged: K/V live in blocks of `block_size` tokens, handed out one at a time by a block manager, and
each sequence names its blocks in a block table (block j holds its tokens [j * block_size, (j + 1) * block_size)).
Memory is what the requests hold, not a maximum length per sequence. Blocks that several sequences share (a
cached prefix, `n` choices of one prompt) are named in each one's table and read where they lie. The last block
is the null block: padding rows write there and padded table entries point there. A translator's encoder K/V sit
in a second store, one row per request slot, written once per request.

Attention reads the blocks in place. On the CPU the paged kernel (model/csrc/paged_attention.cpp) attends every
row of the step, decode rows and prefill chunks alike, over its table in one call per layer; rows of requests
whose attention weights are recorded, and every row where the kernel is not available (no compiler, a GPU),
take the plain torch path: gather the table's blocks, then SDPA (or the explicit softmax when capturing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention import AttentionCapture, KVProjector, attention_weights, share_kv
from model.config import TransformerConfig
from model.masks import causal_mask, length_mask


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeros; on the CPU from calloc, so pages cost memory only once a request has written there."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class BlockPool:
    """Per decoder layer, num_blocks + 1 blocks of block_size slots of (h_kv, d_k) (with grouped-query attention
    only the shared K/V heads are stored); block `num_blocks` is the null block."""

    def __init__(self, cfg: TransformerConfig, num_blocks: int, block_size: int = 16, num_slots: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 kernel: ModuleType | None = None) -> None:
        self.num_blocks, self.block_size, self.null_block = num_blocks, block_size, num_blocks
        device = torch.device(device)
        shape = (cfg.n_decoder_layers, num_blocks + 1, block_size, cfg.kv_heads, cfg.d_k)
        self.k, self.v = lazy_zeros(shape, dtype, device), lazy_zeros(shape, dtype, device)
        self.kernel = kernel
        self.num_copies = 0  # blocks copied (copy on write at admission; attention never copies a block)
        self.cross_k: Tensor | None = None
        self.cross_v: Tensor | None = None
        if cfg.is_encoder_decoder:
            cross = (cfg.n_decoder_layers, num_slots + 1, cfg.max_len, cfg.h, cfg.d_k)
            self.cross_k, self.cross_v = lazy_zeros(cross, dtype, device), lazy_zeros(cross, dtype, device)

    @staticmethod
    def bytes_per_block(cfg: TransformerConfig, block_size: int, dtype: torch.dtype) -> int:
        """K and V of every decoder layer for block_size tokens (h_kv heads of d_k each)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_decoder_layers * block_size * cfg.kv_heads * cfg.d_k * itemsize

    def slot(self, block: int, offset: int) -> int:
        return block * self.block_size + offset

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v (N, h_kv, d_k) go to `slots` (N,) in place (rounded to the pool's dtype where it is narrower)."""
        self.k[layer].view(-1, *self.k.shape[3:]).index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].view(-1, *self.v.shape[3:]).index_copy_(0, slots, v.to(self.v.dtype))

    def write_cross(self, layer: int, slot: int, k: Tensor, v: Tensor) -> None:
        """The encoder memory's k, v (S, h, d_k) for the request in `slot`."""
        assert self.cross_k is not None and self.cross_v is not None
        self.cross_k[layer, slot, : k.size(0)] = k
        self.cross_v[layer, slot, : v.size(0)] = v

    def copy(self, source: int, dest: int, n: int) -> None:
        """The first n tokens of every layer's K/V from block `source` to block `dest` (copy on write)."""
        self.num_copies += 1
        for t in (self.k, self.v):
            t[:, dest, :n] = t[:, source, :n]

    def clear(self, blocks: list[int], slot: int | None = None) -> None:
        """Zero blocks (and a translator's slot) after a request whose K/V may hold NaN."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
        self.k.index_fill_(1, index, 0.0)
        self.v.index_fill_(1, index, 0.0)
        if self.cross_k is not None and self.cross_v is not None and slot is not None:
            self.cross_k[:, slot].zero_()
            self.cross_v[:, slot].zero_()


@dataclass(frozen=True)
class PrefillChunk:
    """Rows [row, row + num_new) of the step are tokens start.. of the sequence whose table is row `table`
    (causal among them); a translator's encoder K/V are in `slot`."""

    row: int
    num_new: int
    table: int
    start: int
    source_len: int = 0  # a translator's encoder tokens
    slot: int = 0


@dataclass
class StepLayout:
    """Where one step's flattened tokens go and what each row attends over. Rows [0, num_decode) decode one
    token each, row i with table i; prefill chunks follow. Padding rows (a captured bucket) write to the null
    block and see one key."""

    write_slots: Tensor  # (N,) pool slot of each row's K/V
    tables: Tensor  # (R, W) block ids per sequence, padded with the null block
    row_table: Tensor  # (N,) each row's table
    context_lens: Tensor  # (N,) keys each row sees
    num_decode: int = 0
    decode_len: int = 0  # the decode rows' longest context (or a captured bucket)
    prefills: list[PrefillChunk] = field(default_factory=list)
    capture: frozenset[int] = frozenset()  # tables whose attention rows are recorded (plain, explicit path)
    cross_len: int = 0
    cross_slots: Tensor | None = None  # (num_decode,) each decode row's slot (a translator)
    cross_mask: Tensor | None = None  # (num_decode, 1, 1, cross_len)


class PagedKVCache:
    """One engine step over the pool: writes each row's K/V to its slot, then attends each row over its block
    table. Captured rows' last-query weights land in `rows[(kind, layer)][table]` as (h, T_k)."""

    def __init__(self, pool: BlockPool, layout: StepLayout) -> None:
        self.pool, self.layout = pool, layout
        self.rows: dict[tuple[str, int], dict[int, Tensor]] = {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, capture: AttentionCapture | None) -> Tensor:
        lay, pool = self.layout, self.pool
        pool.write(layer, lay.write_slots, k[0], v[0])  # (N, h_kv, d_k) each
        keys, values = pool.k[layer], pool.v[layer]  # (blocks, bs, h_kv, d_k)
        wants = capture is not None and capture.wants("decoder_self", layer)
        capturing = lay.capture if wants else frozenset()
        qs = q[0]  # (N, h, d_k)
        if pool.kernel is not None:
            out = pool.kernel.paged_attention(qs.contiguous(), keys, values, lay.tables, lay.row_table,
                                              lay.context_lens, qs.size(-1) ** -0.5)
            plain_decode = bool(capturing & set(range(lay.num_decode)))
            chunks = [c for c in lay.prefills if c.table in capturing]
        else:
            out, plain_decode, chunks = torch.empty_like(qs), lay.num_decode > 0, lay.prefills
        if plain_decode:
            self._decode(out, qs, keys, values, layer, capturing)
        for c in chunks:
            kp, vp = (self._gather(t, c.table, c.start + c.num_new)[None].to(qs.dtype) for t in (keys, values))
            self._chunk(out, qs, kp, vp, c, "decoder_self", layer, causal_mask(c.num_new, kp.size(2), q.device),
                        c.table in capturing)
        return out[None]  # (1, N, h, d_k)

    def attend_cross(self, layer: int, q: Tensor, project: KVProjector, capture: AttentionCapture | None) -> Tensor:
        """A translator's cross-attention over its slot's encoder K/V (the plain path: sources are short)."""
        if self.pool.cross_k is None or self.pool.cross_v is None:
            raise RuntimeError("cross-attention K/V were not written for this batch")
        lay, qs = self.layout, q[0]
        wants = capture is not None and capture.wants("cross", layer)
        out = torch.empty_like(qs)
        s = lay.num_decode
        if s:
            assert lay.cross_slots is not None
            kd, vd = (t[layer].index_select(0, lay.cross_slots[:s])[:, : lay.cross_len].transpose(1, 2).to(qs.dtype)
                      for t in (self.pool.cross_k, self.pool.cross_v))  # (S, h, L, d_k)
            self._rows_attend(out, qs, kd, vd, lay.cross_mask, "cross", layer, lay.capture if wants else frozenset())
        for c in lay.prefills:
            kp, vp = (t[layer, c.slot, : c.source_len].transpose(0, 1)[None].to(qs.dtype)
                      for t in (self.pool.cross_k, self.pool.cross_v))
            self._chunk(out, qs, kp, vp, c, "cross", layer, None, wants and c.table in lay.capture)
        return out[None]

    # --- the plain path -----------------------------------------------------------------------------------------

    def _gather(self, t: Tensor, table: int, n_keys: int) -> Tensor:
        """Keys (or values) 0..n_keys of one sequence, gathered from its blocks: (h_kv, n_keys, d_k)."""
        nb = -(-n_keys // self.pool.block_size)
        blocks = t.index_select(0, self.layout.tables[table, :nb])  # (nb, bs, h_kv, d_k)
        return blocks.flatten(0, 1)[:n_keys].transpose(0, 1)

    def _decode(self, out: Tensor, qs: Tensor, keys: Tensor, values: Tensor, layer: int,
                capturing: frozenset[int]) -> None:
        """Decode rows as one batch over their gathered tables, masked to each row's length."""
        lay, s = self.layout, self.layout.num_decode
        width = -(-lay.decode_len // self.pool.block_size)
        mask = length_mask(lay.context_lens[:s], lay.decode_len)
        kd, vd = ((t[lay.tables[:s, :width]].flatten(1, 2)[:, : lay.decode_len].transpose(1, 2).to(qs.dtype))
                  for t in (keys, values))  # (S, h_kv, L, d_k)
        self._rows_attend(out, qs, kd, vd, mask, "decoder_self", layer, capturing)

    def _rows_attend(self, out: Tensor, qs: Tensor, kd: Tensor, vd: Tensor, mask: Tensor | None, kind: str,
                     layer: int, capturing: frozenset[int]) -> None:
        """Rows [0, S) with one query each: a K/V head's group of query heads are that head's query rows
        (grouped-query attention without repeating K/V)."""
        s, h, h_kv = self.layout.num_decode, qs.size(1), kd.size(1)
        qd = qs[:s].view(s, h_kv, h // h_kv, qs.size(-1))  # (S, h_kv, g, d_k)
        rows = [i for i in range(s) if i in capturing]
        if rows:
            w = attention_weights(qd, kd, mask)  # (S, h_kv, g, L)
            per_head = w.reshape(s, h, -1)
            self._keep(kind, layer, {i: per_head[i] for i in rows})
            od = w @ vd
        else:
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
        out[:s] = od.reshape(s, h, -1)

    def _chunk(self, out: Tensor, qs: Tensor, kp: Tensor, vp: Tensor, c: PrefillChunk, kind: str, layer: int,
               mask: Tensor | None, captured: bool) -> None:
        """One prefill chunk's rows over its keys kp, vp (1, h_kv, T_k, d_k)."""
        h = qs.size(1)
        qp = qs[c.row : c.row + c.num_new].transpose(0, 1)[None]  # (1, h, n, d_k)
        if captured:
            w = attention_weights(qp, share_kv(kp, h), mask)  # (1, h, n, T_k)
            self._keep(kind, layer, {c.table: w[0, :, -1]})
            op = w @ share_kv(vp, h)
        elif mask is not None and c.start == 0:
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=kp.size(1) != h)
        else:
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=kp.size(1) != h)
        out[c.row : c.row + c.num_new] = op[0].transpose(0, 1)

    def _keep(self, kind: str, layer: int, rows: dict[int, Tensor]) -> None:
        self.rows.setdefault((kind, layer), {}).update(rows)
