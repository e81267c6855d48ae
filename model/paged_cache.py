"""The serving engine's KV memory (`BlockPool`) and one step's ragged view of it (`PagedKVCache`).

The pool is paged: K/V live in blocks of `block_size` tokens that a block manager hands out. Its allocator keeps
each request's own blocks contiguous: a request sits in a seat, a run of `blocks_per_seat` blocks (block j of
seat s is block s * blocks_per_seat + j), so its keys and values are one strided view and a whole decode batch
is one view of the pool, read in place by attention; nothing is gathered or copied per step (on a CPU, copying
every request's context in every layer cost more than the attention itself). The last seat is the null seat:
padding rows write there. A translator's encoder K/V sit in a second pool of seats, written once per request.

A request may share its leading blocks with others (a cached prefix, `n` choices of one prompt): those keys lie
in another seat at the same positions (a `SharedRun`). Decode rows then attend in parts, as cascade attention
does: their own seat in place, each shared run once for all the rows that share it (one matmul), the parts
merged by their log-sum-exp; a prefill chunk reads its shared runs and its own keys as one concatenation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention import AttentionCapture, attention_weights, share_kv
from model.config import TransformerConfig
from model.kv_cache import KVProjector
from model.masks import causal_mask


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeros; on the CPU from calloc, so pages cost memory only once a request has written there."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class BlockPool:
    """Preallocated K/V: per decoder layer, (num_seats + 1) seats of seat_len slots of (h_kv, d_k): with
    grouped-query attention only the shared K/V heads are stored."""

    def __init__(self, cfg: TransformerConfig, num_seats: int, seat_len: int, block_size: int = 16,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        assert seat_len % block_size == 0, "a seat is a whole number of blocks"
        self.num_seats, self.seat_len, self.block_size = num_seats, seat_len, block_size
        self.blocks_per_seat = seat_len // block_size
        self.null_seat = num_seats
        device = torch.device(device)
        shape = (cfg.n_decoder_layers, num_seats + 1, seat_len, cfg.kv_heads, cfg.d_k)
        self.k, self.v = lazy_zeros(shape, dtype, device), lazy_zeros(shape, dtype, device)
        self.cross_k: Tensor | None = None
        self.cross_v: Tensor | None = None
        if cfg.is_encoder_decoder:
            cross = (cfg.n_decoder_layers, num_seats + 1, cfg.max_len, cfg.h, cfg.d_k)
            self.cross_k, self.cross_v = lazy_zeros(cross, dtype, device), lazy_zeros(cross, dtype, device)

    @staticmethod
    def bytes_per_block(cfg: TransformerConfig, block_size: int, dtype: torch.dtype) -> int:
        """K and V of every decoder layer for block_size tokens (h_kv heads of d_k each)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_decoder_layers * block_size * cfg.kv_heads * cfg.d_k * itemsize

    def slot(self, seat: int, position: int) -> int:
        return seat * self.seat_len + position

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v (N, h_kv, d_k) go to `slots` (N,) in place."""
        self.k[layer].view(-1, *self.k.shape[3:]).index_copy_(0, slots, k)
        self.v[layer].view(-1, *self.v.shape[3:]).index_copy_(0, slots, v)

    def write_cross(self, layer: int, seat: int, k: Tensor, v: Tensor) -> None:
        """The encoder memory's k, v (S, h, d_k) for the request in `seat`."""
        assert self.cross_k is not None and self.cross_v is not None
        self.cross_k[layer, seat, : k.size(0)] = k
        self.cross_v[layer, seat, : v.size(0)] = v

    def copy(self, source: int, dest: int, at: int, n: int) -> None:
        """Positions [at, at + n) of every layer's K/V from seat `source` to seat `dest` (copy on write)."""
        for t in (self.k, self.v):
            t[:, dest, at : at + n] = t[:, source, at : at + n]

    def clear(self, seat: int) -> None:
        """Zero a seat (after a request whose K/V may hold NaN, so that no later mask meets a NaN)."""
        for t in (self.k, self.v, self.cross_k, self.cross_v):
            if t is not None:
                t[:, seat].zero_()


@dataclass(frozen=True)
class PrefillChunk:
    """Rows [row, row + num_new) of the step are tokens start.. of the request in `seat` (causal among them).
    Its keys before `own_from` lie in `shared` runs (seat, start, end) of other seats."""

    row: int
    num_new: int
    seat: int
    start: int
    source_len: int = 0  # a translator's encoder tokens
    shared: tuple[tuple[int, int, int], ...] = ()
    own_from: int = 0


@dataclass(frozen=True)
class SharedRun:
    """Keys [start, end) of the decode rows `rows` lie in `seat`: blocks they share with the request there."""

    seat: int
    start: int
    end: int
    rows: Tensor  # (n,) decode rows


@dataclass
class StepLayout:
    """Where one step's flattened tokens go. Rows [0, num_decode) decode one token each, row s for seat s
    (rows of seats with nothing to decode are padding: they write to the null seat and are never read)."""

    write_slots: Tensor  # (N,) slot of each row's K/V
    num_decode: int = 0
    decode_len: int = 0  # keys the decode rows attend over (their longest context, or a captured bucket)
    decode_mask: Tensor | None = None  # (num_decode, 1, 1, decode_len): each row's own keys
    cross_len: int = 0
    cross_mask: Tensor | None = None  # (num_decode, 1, 1, cross_len)
    prefills: list[PrefillChunk] = field(default_factory=list)
    capture_seats: frozenset[int] = frozenset()  # seats whose attention rows are recorded
    shared: list[SharedRun] = field(default_factory=list)  # decode rows' keys in other seats


class PagedKVCache:
    """One engine step over the pool: writes each row's K/V to its slot, then attends every request over its
    own seat in place (decode rows as one batch, each prefill chunk on its own). Rows of `capture_seats` take
    the explicit path; their last query's weights land in `rows[(kind, layer)][seat]` as (h, T_k)."""

    def __init__(self, pool: BlockPool, layout: StepLayout) -> None:
        self.pool, self.layout = pool, layout
        self.rows: dict[tuple[str, int], dict[int, Tensor]] = {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, capture: AttentionCapture | None) -> Tensor:
        self.pool.write(layer, self.layout.write_slots, k[0], v[0])  # (N, h_kv, d_k) each
        lay = self.layout
        return self._ragged("decoder_self", layer, q[0], self.pool.k[layer], self.pool.v[layer],
                            lay.decode_len, lay.decode_mask, capture)

    def attend_cross(self, layer: int, q: Tensor, project: KVProjector, capture: AttentionCapture | None) -> Tensor:
        if self.pool.cross_k is None or self.pool.cross_v is None:
            raise RuntimeError("cross-attention K/V were not written for this batch")
        lay = self.layout
        return self._ragged("cross", layer, q[0], self.pool.cross_k[layer], self.pool.cross_v[layer],
                            lay.cross_len, lay.cross_mask, capture)

    def _ragged(self, kind: str, layer: int, q: Tensor, keys: Tensor, values: Tensor, decode_len: int,
                decode_mask: Tensor | None, capture: AttentionCapture | None) -> Tensor:
        """q (N, h, d_k); keys/values (seats, seat_len, h, d_k) of one layer -> (1, N, h, d_k)."""
        lay = self.layout
        wants = capture is not None and capture.wants(kind, layer) and bool(lay.capture_seats)
        parts = []
        s = lay.num_decode
        h, h_kv = q.size(1), keys.size(2)
        if s:
            # A decode row's g = h / h_kv query heads that share a K/V head are g query rows over that head:
            # grouped-query attention without repeating K/V.
            qd = q[:s].view(s, h_kv, h // h_kv, q.size(-1))  # (S, h_kv, g, d_k)
            kd = keys[:s, :decode_len].transpose(1, 2)  # (S, h_kv, L, d_k): each seat's run, in place
            vd = values[:s, :decode_len].transpose(1, 2)
            shared = lay.shared if kind == "decoder_self" else []
            if shared:
                assert decode_mask is not None
                od = self._cascade(qd, kd, vd, decode_mask, keys, values, shared)
            if wants:  # a request whose rows are captured shares no block: its own keys are all of them
                w = attention_weights(qd, kd, decode_mask)  # (S, h_kv, g, L)
                per_head = w.reshape(s, h, -1)  # (S, h, L)
                self._keep(kind, layer, {i: per_head[i] for i in range(s) if i in lay.capture_seats})
                if not shared:
                    od = w @ vd
            elif not shared:  # every decode row sees at least one key, so no row needs zeroing
                od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=decode_mask)
            parts.append(od.reshape(s, *q.shape[1:]))  # (S, h, d_k)
        for c in lay.prefills:
            qp = q[c.row : c.row + c.num_new].transpose(0, 1)[None]  # (1, h, n, d_k)
            n_keys = c.source_len if kind == "cross" else c.start + c.num_new
            own = kind == "cross" or not c.shared  # cross-attention keys are always the seat's own
            kp, vp = (t[c.seat, :n_keys].transpose(0, 1)[None] if own else self._chunk_keys(t, c, n_keys)
                      for t in (keys, values))  # (1, h_kv, T_k, d_k)
            mask = None if kind == "cross" else causal_mask(c.num_new, n_keys, q.device)
            gqa = kp.size(1) != h  # SDPA reads each K/V head for its group of query heads, without a copy
            if wants and c.seat in lay.capture_seats:
                w = attention_weights(qp, share_kv(kp, h), mask)  # (1, h, n, T_k)
                self._keep(kind, layer, {c.seat: w[0, :, -1]})
                op = w @ share_kv(vp, h)
            elif mask is not None and c.start == 0:
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa)
            else:
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=gqa)
            parts.append(op[0].transpose(0, 1))  # (n, h, d_k)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out[None]  # (1, N, h, d_k)

    @staticmethod
    def _chunk_keys(keys: Tensor, c: PrefillChunk, n_keys: int) -> Tensor:
        """A chunk's keys when its first ones are shared: its runs, then its own, in position order."""
        parts = [keys[seat, a:b] for seat, a, b in c.shared] + [keys[c.seat, c.own_from : n_keys]]
        return torch.cat(parts).transpose(0, 1)[None]

    @staticmethod
    def _cascade(qd: Tensor, kd: Tensor, vd: Tensor, mask: Tensor, keys: Tensor, values: Tensor,
                 shared: list[SharedRun]) -> Tensor:
        """Decode attention over each row's own keys (in place, `mask`) and its shared runs, merged exactly:
        softmax over the union = the parts' exp-sums rescaled to a common running maximum. qd (S, h_kv, g, d_k)
        holds each K/V head's group of query heads as rows; returns the same shape."""
        scale = qd.size(-1) ** -0.5
        logits = ((qd @ kd.transpose(-2, -1)) * scale).float().masked_fill(~mask, float("-inf"))  # (S, h_kv, g, L)
        top = logits.amax(-1, keepdim=True)  # finite: a decode row's newest key is always its own
        p = (logits - top).exp()
        den, num = p.sum(-1, keepdim=True), (p.to(vd.dtype) @ vd).float()
        for run in shared:
            rows = run.rows
            k = keys[run.seat, run.start : run.end].transpose(0, 1)  # (h_kv, T, d_k): read once for all its rows
            v = values[run.seat, run.start : run.end].transpose(0, 1)
            part = ((qd.index_select(0, rows) @ k.transpose(-2, -1)) * scale).float()  # (n, h_kv, g, T)
            old = top.index_select(0, rows)
            new = torch.maximum(old, part.amax(-1, keepdim=True))
            keep, p = (old - new).exp(), (part - new).exp()
            den.index_copy_(0, rows, den.index_select(0, rows) * keep + p.sum(-1, keepdim=True))
            num.index_copy_(0, rows, num.index_select(0, rows) * keep + (p.to(v.dtype) @ v).float())
            top.index_copy_(0, rows, new)
        return (num / den).to(qd.dtype)

    def _keep(self, kind: str, layer: int, rows: dict[int, Tensor]) -> None:
        self.rows.setdefault((kind, layer), {}).update(rows)
