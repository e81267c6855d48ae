"""Batched prefill and decode on the device: the only engine file that imports the model package.

A step runs at most two forwards: one padded batch of prefills (new or recomputed requests, translator
requests also run their encoder here) and one batch of single-token decodes. Both read and write K/V through a
`PagedKVCache` over one preallocated `BlockPool`, addressed by each request's block table."""

from __future__ import annotations

import torch
from torch import Tensor

from model.attention import AttentionCapture
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
            assert layer.cross_attn is not None
            k, v = layer.cross_attn.project_kv(memory)  # (B, h, S, d_k)
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

    @torch.inference_mode()
    def execute(self, prefills: list[ScheduledRequest], decodes: list[ScheduledRequest]) -> Tensor:
        """Logits (len(prefills) + len(decodes), vocab), prefills first."""
        parts = []
        if prefills:
            encode = [s for s in prefills if s.encode_source]
            if encode:
                self._write_cross(encode)
            parts.append(self._forward(prefills))
        if decodes:
            parts.append(self._forward(decodes))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
