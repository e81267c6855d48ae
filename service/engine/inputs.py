"""A step's inputs in persistent buffers: written in place on the host, sent to the device in one copy.

The buffer is allocated once (pinned on the host when the device is CUDA) as raw bytes holding int64 sections
(token ids, positions, KV slots, block tables, each row's table and context length, rows to sample, encoder
sources) and a float32 section (each
sampled row's parameters). Its device twin has the same layout, so every device view below is the same storage
from step to step, which is what a captured CUDA graph needs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.masks import length_mask
from model.paged_cache import BlockPool, PrefillChunk, StepLayout
from service.engine.request import Request
from service.engine.sampler import PARAMS, param_values
from service.engine.scheduler import ScheduledRequest


class Transfers:
    """The one instrumented copy each way: every host<->device transfer of a step goes through here."""

    def __init__(self) -> None:
        self.to_device = 0
        self.to_host = 0

    def h2d(self, dst: Tensor, src: Tensor) -> None:
        self.to_device += 1
        dst.copy_(src, non_blocking=True)

    def d2h(self, src: Tensor) -> Tensor:
        self.to_host += 1
        return src.to("cpu")


@dataclass
class Prepared:
    """The host's view of one packed step: the layout for the KV cache and what the sampler needs to know."""

    layout: StepLayout
    num_rows: int
    sample_index: list[int]  # plan entry -> row of the sampled logits, or -1
    sampled: list[ScheduledRequest]  # the plan entries that sample, in logits order
    tables: list[int]  # plan entry -> its block table's row (where its captured attention rows are kept)
    encode: list[ScheduledRequest] = field(default_factory=list)
    source_len: int = 0
    scored: list[tuple[str, int, int]] = field(default_factory=list)  # (request id, position, token) per scored row
    masked: list[int] = field(default_factory=list)  # sampled rows held to a grammar (their mask: StepInputs.d_mask)
    stuck: set[int] = field(default_factory=set)  # of which the grammar allows no token here


def token_at(req: Request, start: int, n: int) -> list[int]:
    """Tokens [start, start + n) of prompt + output, without building the whole list."""
    p = len(req.prompt_ids)
    if start + n <= p:
        return req.prompt_ids[start : start + n]
    if start >= p:
        return req.output_ids[start - p : start - p + n]
    return req.prompt_ids[start:] + req.output_ids[: start + n - p]


class StepInputs:
    """The persistent input buffers of one model runner and the packing of a plan into them."""

    def __init__(self, pool: BlockPool, max_tokens: int, max_seqs: int, max_blocks: int, max_source: int,
                 device: torch.device, vocab_size: int = 0) -> None:
        self.pool, self.device, self.max_blocks = pool, device, max_blocks
        rows = max_tokens + max_seqs  # prefill tokens plus one (maybe padding) decode row per request
        sizes = {"tokens": rows, "positions": rows, "slots": rows, "row_table": rows, "context_lens": rows,
                 "score_rows": rows, "score_targets": rows, "sample_rows": max_seqs, "cross_slots": max_seqs,
                 "cross_lens": max_seqs, "tables": 2 * max_seqs * max_blocks, "sources": max_seqs * max_source,
                 "source_lens": max_seqs}
        self.offsets: dict[str, tuple[int, int]] = {}
        at = 0
        for name, n in sizes.items():
            self.offsets[name] = (at, n)
            at += n
        n_f32 = len(PARAMS) * max_seqs
        self.mask_at, self.words = 8 * at + 4 * n_f32, -(-vocab_size // 32)  # grammar bitmasks last (int32 words)
        nbytes = self.mask_at + 4 * max_seqs * self.words
        pin = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        # On a CPU the device's view is the host buffer itself: a step is done with its inputs before the next is
        # packed, and the copy would move the whole buffer (~2 MB of block tables at 256 sequences) every step.
        self.dev = self.host if device.type == "cpu" else torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.np_i64 = self.host.numpy()[: 8 * at].view(np.int64)
        self.np_f32 = self.host.numpy()[8 * at : self.mask_at].view(np.float32).reshape(len(PARAMS), max_seqs)
        dev_i64 = self.dev[: 8 * at].view(torch.int64)
        self.d = {name: dev_i64[a : a + n] for name, (a, n) in self.offsets.items()}
        self.d_params = self.dev[8 * at : self.mask_at].view(torch.float32).view(len(PARAMS), max_seqs)
        self.h_mask = self.host[self.mask_at :].view(torch.int32).view(max_seqs, self.words)
        self.d_mask = self.dev[self.mask_at :].view(torch.int32).view(max_seqs, self.words)
        self.masks: Any = None  # structured.TokenMasks, made when a request with a grammar first samples
        self.transfers = Transfers()
        self.copied: torch.cuda.Event | None = None  # CUDA: marks the end of the last non-blocking copy

    def _put(self, name: str, at: int, values: list[int] | range | np.ndarray) -> None:
        a, _ = self.offsets[name]
        self.np_i64[a + at : a + at + len(values)] = values

    def _fill(self, name: str, at: int, n: int, value: int) -> None:
        a, _ = self.offsets[name]
        self.np_i64[a + at : a + at + n] = value

    def table_view(self, rows: int, width: int) -> Tensor:
        """The device view of `rows` block tables of `width` blocks (the same storage every step)."""
        return self.d["tables"][: rows * width].view(rows, width)

    def prepare(self, plan: list[ScheduledRequest], capture_ids: set[str], decode_rows: int | None = None,
                decode_len: int | None = None) -> Prepared:
        """Pack the plan: rows [0, S) decode one token each (row i over table i), then the prefill chunks, each
        over its own table. `decode_rows` / `decode_len` pad the decode part to a captured bucket."""
        pool, bs = self.pool, self.pool.block_size
        if self.copied is not None:  # the last step's copy may still be reading the pinned buffer we rewrite now
            self.copied.synchronize()
        decodes = [s for s in plan if s.num_new == 1]
        prefills = [s for s in plan if s.num_new > 1]
        s_real = len(decodes)
        s_rows = max(s_real, decode_rows or 0)
        num_tables = s_rows + len(prefills)
        need = [-(-(s.start + s.num_new) // bs) for s in (*decodes, *prefills)]
        width = max([*need, -(-(decode_len or 1) // bs)])
        a, _ = self.offsets["tables"]
        tables = self.np_i64[a : a + num_tables * width].reshape(num_tables, width)
        tables[:] = pool.null_block
        for i, s in enumerate((*decodes, *prefills)):
            ids = s.table.block_ids[: need[i]]
            tables[i if i < s_real else i - s_real + s_rows, : len(ids)] = ids
        longest = 1
        if s_rows:  # one write per field for all decode rows (from lists: a step of few rows is mostly overhead)
            pad = s_rows - s_real
            starts = [s.start for s in decodes] + [0] * pad
            self._put("tokens", 0, [token_at(s.request, s.start, 1)[0] for s in decodes] + [0] * pad)
            self._put("positions", 0, starts)
            self._put("slots", 0, [s.table.block_ids[s.start // bs] * bs + s.start % bs for s in decodes]
                      + [pool.slot(pool.null_block, 0)] * pad)
            self._put("row_table", 0, range(s_rows))
            self._put("context_lens", 0, [p + 1 for p in starts])
            longest = max(starts) + 1
        row, chunks = s_rows, []
        for j, s in enumerate(prefills):
            req, t = s.request, s_rows + j
            positions = np.arange(s.start, s.start + s.num_new, dtype=np.int64)
            self._put("tokens", row, token_at(req, s.start, s.num_new))
            self._put("positions", row, positions)
            self._put("slots", row, tables[t, positions // bs] * bs + positions % bs)
            self._fill("row_table", row, s.num_new, t)
            self._put("context_lens", row, positions + 1)  # every prompt row on the paged kernel (NOTES.md s. 24)
            chunks.append(PrefillChunk(row, s.num_new, t, s.start, len(req.source_ids or []), s.table.slot or 0))
            row += s.num_new
        table_of = {id(s): i for i, s in enumerate(decodes)} | {id(s): s_rows + j for j, s in enumerate(prefills)}
        sample_index, rows = [-1] * len(plan), []
        sampled: list[ScheduledRequest] = []
        chunk_end = {id(s): c.row + c.num_new - 1 for s, c in zip(prefills, chunks, strict=True)}
        last_row = chunk_end | {id(s): i for i, s in enumerate(decodes)}
        for i, s in enumerate(plan):
            if s.samples:
                sample_index[i] = len(sampled)
                sampled.append(s)
                rows.append(last_row[id(s)])
        self._put("sample_rows", 0, rows)
        for j, s in enumerate(sampled):
            self.np_f32[:, j] = param_values(s.request.params)
        cross = self._pack_cross(decodes)
        scored = self._pack_scores(plan, last_row)
        encode = [s for s in plan if s.encode_source]
        source_len = self._pack_sources(encode)
        masked, stuck = self._pack_masks([s.request for s in sampled])
        end = self.mask_at + 4 * self.words * (len(sampled) if masked else 0)
        if self.dev is self.host:  # a CPU: one buffer, nothing moves
            self.transfers.to_device += 1
        else:
            self.transfers.h2d(self.dev[:end], self.host[:end])  # the step's one host-to-device copy
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()
        if decode_len is not None:  # a captured bucket (decoder-only models)
            longest = max(longest, decode_len)
        capture = frozenset(table_of[id(s)] for s in plan if s.request.request_id in capture_ids)
        layout = StepLayout(self.d["slots"][:row], self.table_view(num_tables, width), self.d["row_table"][:row],
                            self.d["context_lens"][:row], s_rows, longest, chunks, capture)
        if cross and pool.cross_k is not None:
            layout.cross_len, layout.cross_slots = cross, self.d["cross_slots"][:s_real]
            layout.cross_mask = length_mask(self.d["cross_lens"][:s_real], cross)
        tables_of_plan = [table_of[id(s)] for s in plan]
        return Prepared(layout, row, sample_index, sampled, tables_of_plan, encode, source_len, scored, masked, stuck)

    def advance(self, prep: Prepared, plan: list[ScheduledRequest]) -> Prepared | None:
        """The step after `prep` for the same decode rows, each one position on (a decode burst, engine/burst.py):
        only what moves is written (each row's token, position, slot and length, and a block id where a row
        enters a new block); None where a row outgrows the tables' width (`prepare` then packs it whole)."""
        lay, bs = prep.layout, self.pool.block_size
        rows, width = lay.tables.shape
        if len(plan) != rows or prep.num_rows != rows or lay.prefills or self.dev is not self.host:
            return None
        starts = [s.start for s in plan]
        if max(starts) // bs >= width:
            return None
        a, _ = self.offsets["tables"]
        tables = self.np_i64[a : a + rows * width].reshape(rows, width)
        for i, s in enumerate(plan):
            if s.start % bs == 0:
                tables[i, s.start // bs] = s.table.block_ids[s.start // bs]
        self._put("tokens", 0, [s.request.output_ids[-1] for s in plan])  # the token at `start`: the last one
        self._put("positions", 0, starts)
        self._put("slots", 0, [s.table.block_ids[p // bs] * bs + p % bs for s, p in zip(plan, starts, strict=True)])
        self._put("context_lens", 0, [p + 1 for p in starts])
        self.transfers.to_device += 1  # a CPU's one buffer: nothing moves
        return replace(prep, layout=replace(lay, decode_len=max(starts) + 1), sampled=plan)

    def _pack_masks(self, reqs: list[Request]) -> tuple[list[int], set[int]]:
        """Grammar bitmasks of the sampled rows whose request holds a matcher (service/engine/structured.py)."""
        if not any(r.matcher is not None for r in reqs):
            return [], set()
        if self.masks is None:
            from service.engine.structured import TokenMasks  # xgrammar loads when a constraint first runs

            self.masks = TokenMasks(self.words * 32)
        return self.masks.fill(reqs, self.h_mask)

    def _pack_cross(self, decodes: list[ScheduledRequest]) -> int:
        """A translator's decode rows: each row's slot and source length; the longest source."""
        if not decodes or decodes[0].request.source_ids is None:
            return 0
        self._put("cross_slots", 0, [s.table.slot or 0 for s in decodes])
        lens = [len(s.request.source_ids or []) for s in decodes]
        self._put("cross_lens", 0, lens)
        return max(lens)

    def _pack_scores(self, plan: list[ScheduledRequest], last_row: dict[int, int]) -> list[tuple[str, int, int]]:
        """Rows whose logits score the next prompt token, for requests that ask for prompt logprobs: the row at
        position p predicts prompt token p + 1."""
        rows, targets, scored = [], [], []
        for s in plan:
            req = s.request
            plen = len(req.prompt_ids)
            if req.params.prompt_logprobs is None or s.start >= plen - 1:
                continue
            last = last_row[id(s)]  # the chunk's last row
            for p in range(s.start, min(s.start + s.num_new, plen - 1)):
                rows.append(last - (s.start + s.num_new - 1 - p))
                targets.append(req.prompt_ids[p + 1])
                scored.append((req.request_id, p + 1, req.prompt_ids[p + 1]))
        self._put("score_rows", 0, rows)
        self._put("score_targets", 0, targets)
        return scored

    def _pack_sources(self, encode: list[ScheduledRequest]) -> int:
        """Translator requests starting this step: their sources, right-padded, as a (B, S) block."""
        if not encode:
            return 0
        width = max(len(s.request.source_ids or []) for s in encode)
        a, _ = self.offsets["sources"]
        block = self.np_i64[a : a + len(encode) * width].reshape(len(encode), width)
        block[:] = 0
        for i, s in enumerate(encode):
            src = s.request.source_ids or []
            block[i, : len(src)] = src
        self._put("source_lens", 0, [len(s.request.source_ids or []) for s in encode])
        return width

    def sources(self, n: int, width: int) -> tuple[Tensor, Tensor]:
        """Device views: sources (n, width) and their validity mask (n, width)."""
        src = self.d["sources"][: n * width].view(n, width)
        lens = self.d["source_lens"][:n]
        return src, torch.arange(width, device=self.device)[None, :] < lens[:, None]
