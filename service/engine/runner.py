"""Batched prefill and decode on the device: the only engine file that imports the model package.

A step runs at most two forwards: one padded batch of prefills (new or recomputed requests, translator
requests also run their encoder here) and one batch of single-token decodes. Both read and write K/V through a
`PagedKVCache` over one preallocated `BlockPool`, addressed by each request's block table."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from model.attention import AttentionCapture, MultiHeadAttention
from model.kv_cache import BlockPool, PagedKVCache
from model.transformer import DecoderOnlyLM, Transformer
from service.engine.scheduler import ScheduledRequest


class ModelRunner:
    """Owns the model on its device and the KV block pool; turns scheduled requests into next-token logits."""

    def __init__(
        self,
        model: Transformer | DecoderOnlyLM,
        num_blocks: int,
        block_size: int = 16,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.config = model.config
        self.block_size = block_size
        self.pool = BlockPool(self.config, num_blocks, block_size, self.device, dtype)
        self.attention: dict[str, dict[str, Any]] = {}  # request id -> this step's rows (AttentionSpec)
        self.num_threads = torch.get_num_threads()  # the process's intra-op setting when the model was loaded

    def bind_thread(self) -> None:
        """Apply `num_threads` to the calling thread (the engine loop): OpenMP's thread count is per OS thread,
        so a new thread would use one per core whatever `torch.set_num_threads` said elsewhere."""
        torch.set_num_threads(self.num_threads)

    # --- index arithmetic: where each token's K/V lives --------------------------------------------------------

    def _slots(self, tables: list[list[int]], length: int) -> Tensor:
        """(B, length) slot of every position 0..length-1 of each request (positions past the table -> slot 0)."""
        width = max(1, max(len(t) for t in tables))
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)  # (B, n_blocks)
        pos = torch.arange(length)
        block = table.gather(1, (pos // self.block_size).clamp(max=width - 1).expand(len(tables), -1))
        return (block * self.block_size + pos % self.block_size).to(self.device)  # (B, L)

    def _write_cross(self, batch: list[ScheduledRequest]) -> None:
        """Run the encoder once for new translator requests and store each layer's cross-attention K/V."""
        assert isinstance(self.model, Transformer)
        sources = [s.request.source_ids or [] for s in batch]
        s_max = max(len(s) for s in sources)
        src = torch.tensor([s + [0] * (s_max - len(s)) for s in sources], device=self.device)
        src_valid = torch.arange(s_max, device=self.device)[None, :] < torch.tensor(
            [len(s) for s in sources], device=self.device
        )[:, None]  # (B, S)
        memory = self.model.encode(src, src_valid)  # (B, S, d_model)
        slots = self._slots([s.request.cross_block_ids for s in batch], s_max)[src_valid]  # (N,)
        for i, layer in enumerate(self.model.decoder.layers):
            attn = layer.cross_attn
            assert isinstance(attn, MultiHeadAttention)
            k, v = attn.project_kv(memory)  # (B, h, S, d_k)
            self.pool.write(i, slots, k.transpose(1, 2)[src_valid], v.transpose(1, 2)[src_valid])

    def _cross_view(self, batch: list[ScheduledRequest]) -> tuple[Tensor | None, Tensor | None]:
        if not self.config.is_encoder_decoder:
            return None, None
        lengths = [len(s.request.source_ids or []) for s in batch]
        s_max = max(lengths)
        slots = self._slots([s.request.cross_block_ids for s in batch], s_max)
        valid = torch.arange(s_max)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)
        return slots, valid[:, None, None, :].to(self.device)  # (B, S), (B, 1, 1, S)

    # --- forwards ----------------------------------------------------------------------------------------------

    def _forward(self, batch: list[ScheduledRequest], capture: AttentionCapture | None = None) -> Tensor:
        """Feed tokens [start, start + num_new) of each request; logits (B, vocab) at each one's last new token."""
        b = len(batch)
        t = max(s.num_new for s in batch)
        total = max(s.start + s.num_new for s in batch)
        starts = torch.tensor([s.start for s in batch])
        num_new = torch.tensor([s.num_new for s in batch])
        ids = [s.request.all_ids[s.start : s.start + s.num_new] for s in batch]
        tokens = torch.tensor([x + [0] * (t - len(x)) for x in ids], device=self.device)  # (B, T)
        q_pos = starts[:, None] + torch.arange(t)[None, :]  # (B, T) absolute positions of the queries
        q_valid = torch.arange(t)[None, :] < num_new[:, None]  # (B, T)
        read = self._slots([s.request.block_ids for s in batch], total)  # (B, L)
        k_pos = torch.arange(total)
        # query i of request b sees key j iff j <= its position; padded queries see key 0 only (no empty rows)
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]
        mask[:, :, 0] = True
        write_rows = None if bool(q_valid.all()) else q_valid.reshape(-1).nonzero().squeeze(1).to(self.device)
        write = read.gather(1, q_pos.clamp(max=total - 1).to(self.device))[q_valid.to(self.device)]  # (N,)
        cross_slots, cross_mask = self._cross_view(batch)
        cache = PagedKVCache(
            self.pool, write, write_rows, read, mask[:, None].to(self.device), cross_slots, cross_mask
        )
        positions = q_pos.clamp(max=self.config.max_len - 1).to(self.device)
        hidden = self.model.decode(tokens, positions, cache=cache, capture=capture)  # (B, T, d_model)
        last = hidden[torch.arange(b, device=self.device), (num_new - 1).to(self.device)]  # (B, d_model)
        return self.model.logits(last).float()  # (B, vocab)

    # --- attention rows for requests that stream them -----------------------------------------------------------

    @staticmethod
    def _capture_for(batch: list[ScheduledRequest]) -> AttentionCapture | None:
        """A capture (the explicit attention path) only when some request in the batch asks for rows."""
        specs = [s.request.attention for s in batch if s.request.attention is not None]
        if not specs:
            return None
        layers = None if any(a.layers is None for a in specs) else {i for a in specs for i in a.layers or ()}
        return AttentionCapture({k for a in specs for k in a.kinds}, layers)

    def _keep_rows(self, batch: list[ScheduledRequest], capture: AttentionCapture) -> None:
        """Each asking request's row at its last new token (the query that predicts the next token)."""
        for b, s in enumerate(batch):
            spec = s.request.attention
            if spec is None:
                continue
            q, n_keys = s.num_new - 1, {"decoder_self": s.start + s.num_new, "cross": len(s.request.source_ids or [])}
            heads = list(spec.heads) if spec.heads is not None else list(range(self.config.h))
            rows: dict[str, Any] = {"query_position": s.start + q}
            for kind in spec.kinds:
                layers = spec.layers if spec.layers is not None else range(self.config.n_decoder_layers)
                w = torch.stack([capture.weights[(kind, i)][b, heads, q, : n_keys[kind]] for i in layers])  # (L, H, T_k)
                if spec.aggregation in ("mean", "max"):
                    w = w.mean(1, keepdim=True) if spec.aggregation == "mean" else w.amax(1, keepdim=True)
                rows[kind] = w.double().round(decimals=6).tolist()
            self.attention[s.request.request_id] = rows

    @torch.inference_mode()
    def execute(self, prefills: list[ScheduledRequest], decodes: list[ScheduledRequest]) -> Tensor:
        """Logits (len(prefills) + len(decodes), vocab), prefills first; attention rows land in self.attention."""
        self.attention.clear()
        parts = []
        for batch in (prefills, decodes):
            if not batch:
                continue
            encode = [s for s in batch if s.encode_source]
            if encode:
                self._write_cross(encode)
            capture = self._capture_for(batch)
            parts.append(self._forward(batch, capture))
            if capture is not None:
                self._keep_rows(batch, capture)
        return torch.cat(parts) if len(parts) > 1 else parts[0]
