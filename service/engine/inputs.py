"""A step's inputs in persistent buffers: written in place on the host, sent to the device in one copy.

The buffer is allocated once (pinned on the host when the device is CUDA) as raw bytes holding int64 sections
(token ids, positions, KV slots, rows to sample, context lengths, encoder sources) and a float32 section (each
sampled row's parameters). Its device twin has the same layout, so every device view below is the same storage
from step to step, which is what a captured CUDA graph needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from model.masks import length_mask, span_mask
from model.paged_cache import BlockPool, PrefillChunk, SharedRun, StepLayout
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
    encode: list[ScheduledRequest] = field(default_factory=list)
    source_len: int = 0
    scored: list[tuple[str, int, int]] = field(default_factory=list)  # (request id, position, token) per scored row


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

    def __init__(self, pool: BlockPool, max_tokens: int, max_seqs: int, max_source: int, device: torch.device) -> None:
        self.pool, self.device = pool, device
        rows = max_tokens + pool.num_seats  # prefill tokens plus one (maybe padding) row per seat
        sizes = {"tokens": rows, "positions": rows, "slots": rows, "score_rows": rows, "score_targets": rows,
                 "sample_rows": max_seqs,
                 "decode_lens": pool.num_seats, "decode_starts": pool.num_seats, "cross_lens": pool.num_seats,
                 "run_rows": pool.num_seats * pool.blocks_per_seat, "sources": max_seqs * max_source,
                 "source_lens": max_seqs}
        self.offsets: dict[str, tuple[int, int]] = {}
        at = 0
        for name, n in sizes.items():
            self.offsets[name] = (at, n)
            at += n
        n_f32 = len(PARAMS) * max_seqs
        nbytes = 8 * at + 4 * n_f32
        pin = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.dev = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.np_i64 = self.host.numpy()[: 8 * at].view(np.int64)
        self.np_f32 = self.host.numpy()[8 * at :].view(np.float32).reshape(len(PARAMS), max_seqs)
        dev_i64 = self.dev[: 8 * at].view(torch.int64)
        self.d = {name: dev_i64[a : a + n] for name, (a, n) in self.offsets.items()}
        self.d_params = self.dev[8 * at :].view(torch.float32).view(len(PARAMS), max_seqs)
        self.transfers = Transfers()
        self.copied: torch.cuda.Event | None = None  # CUDA: marks the end of the last non-blocking copy

    def _put(self, name: str, at: int, values: list[int] | range) -> None:
        a, _ = self.offsets[name]
        self.np_i64[a + at : a + at + len(values)] = values

    def _scatter(self, name: str, at: np.ndarray, values: np.ndarray) -> None:
        a, _ = self.offsets[name]
        self.np_i64[a + at] = values

    def _fill(self, name: str, n: int, value: int) -> None:
        a, _ = self.offsets[name]
        self.np_i64[a : a + n] = value

    def prepare(self, plan: list[ScheduledRequest], capture_ids: set[str], decode_seats: int | None = None,
                decode_len: int | None = None) -> Prepared:
        """Pack the plan: rows [0, S) decode one token each for seat == row, then the prefill chunks.
        `decode_seats` / `decode_len` pad the decode part to a captured bucket."""
        pool = self.pool
        if self.copied is not None:  # the last step's copy may still be reading the pinned buffer we rewrite now
            self.copied.synchronize()
        decodes = [s for s in plan if s.num_new == 1]
        prefills = [s for s in plan if s.num_new > 1]
        s_rows = max((s.request.seat or 0) + 1 for s in decodes) if decodes else 0
        s_rows = max(s_rows, decode_seats or 0)
        null = pool.slot(pool.null_seat, 0)
        self._fill("tokens", s_rows, 0)
        self._fill("positions", s_rows, 0)
        self._fill("slots", s_rows, null)
        self._fill("decode_lens", s_rows, 1)
        self._fill("cross_lens", s_rows, 1)
        longest, cross = 1, 1
        if decodes:  # one scatter per field (row = seat), not one write per request
            seats = np.fromiter((s.request.seat or 0 for s in decodes), np.int64, len(decodes))
            starts = np.fromiter((s.start for s in decodes), np.int64, len(decodes))
            tokens = np.fromiter((token_at(s.request, s.start, 1)[0] for s in decodes), np.int64, len(decodes))
            self._scatter("tokens", seats, tokens)
            self._scatter("positions", seats, starts)
            self._scatter("slots", seats, seats * pool.seat_len + starts)
            self._scatter("decode_lens", seats, starts + 1)
            longest = int(starts.max()) + 1
            sources = [(s.request.seat or 0, len(s.request.source_ids)) for s in decodes if s.request.source_ids]
            for seat, n in sources:
                self._put("cross_lens", seat, [n])
                cross = max(cross, n)
        row, chunks = s_rows, []
        for s in prefills:
            req, seat = s.request, s.request.seat or 0
            self._put("tokens", row, token_at(req, s.start, s.num_new))
            self._put("positions", row, range(s.start, s.start + s.num_new))
            self._put("slots", row, range(pool.slot(seat, s.start), pool.slot(seat, s.start + s.num_new)))
            own_from = req.own_start * pool.block_size
            chunks.append(PrefillChunk(row, s.num_new, seat, s.start, len(req.source_ids or []), req.shared_runs,
                                       own_from))
            row += s.num_new
        sample_index, rows = [-1] * len(plan), []
        sampled: list[ScheduledRequest] = []
        chunk_end = {id(s): c.row + c.num_new - 1 for s, c in zip(prefills, chunks, strict=True)}
        for i, s in enumerate(plan):
            if s.samples:
                sample_index[i] = len(sampled)
                sampled.append(s)
                rows.append(chunk_end[id(s)] if s.num_new > 1 else (s.request.seat or 0))
        self._put("sample_rows", 0, rows)
        for j, s in enumerate(sampled):
            self.np_f32[:, j] = param_values(s.request.params)
        runs = self._group_runs(decodes, s_rows)
        scored = self._pack_scores(plan, chunk_end)
        encode = [s for s in plan if s.encode_source]
        source_len = self._pack_sources(encode)
        self.transfers.h2d(self.dev, self.host)  # the step's one host-to-device copy
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()
        if decode_len is not None:  # a captured bucket (decoder-only models)
            longest = max(longest, decode_len)
        layout = StepLayout(self.d["slots"][:row], s_rows, longest, None, cross, None, chunks,
                            frozenset((s.request.seat or 0) for s in plan if s.request.request_id in capture_ids))
        layout.shared = [SharedRun(seat, a, b, self.d["run_rows"][at : at + n]) for seat, a, b, at, n in runs]
        if layout.shared:
            layout.decode_mask = span_mask(self.d["decode_starts"][:s_rows], self.d["decode_lens"][:s_rows], longest)
        elif s_rows:
            layout.decode_mask = length_mask(self.d["decode_lens"][:s_rows], longest)
        if s_rows and pool.cross_k is not None:
            layout.cross_mask = length_mask(self.d["cross_lens"][:s_rows], cross)
        return Prepared(layout, row, sample_index, sampled, encode, source_len, scored)

    def _group_runs(self, decodes: list[ScheduledRequest], s_rows: int) -> list[tuple[int, int, int, int, int]]:
        """Decode rows that share blocks: each row's first own key, and the rows of each shared run (seat, start,
        end) packed one run after another; (seat, start, end, offset, count) per run."""
        sharing = [s for s in decodes if s.request.shared_runs]
        if not sharing:
            return []
        self._fill("decode_starts", s_rows, 0)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for s in sharing:
            req = s.request
            self._put("decode_starts", req.seat or 0, [req.own_start * self.pool.block_size])
            for run in req.shared_runs:
                groups.setdefault(run, []).append(req.seat or 0)
        out, at = [], 0
        for (seat, a, b), rows in groups.items():
            self._put("run_rows", at, rows)
            out.append((seat, a, b, at, len(rows)))
            at += len(rows)
        return out

    def _pack_scores(self, plan: list[ScheduledRequest], chunk_end: dict[int, int]) -> list[tuple[str, int, int]]:
        """Rows whose logits score the next prompt token, for requests that ask for prompt logprobs: the row at
        position p predicts prompt token p + 1."""
        rows, targets, scored = [], [], []
        for s in plan:
            req = s.request
            plen = len(req.prompt_ids)
            if req.params.prompt_logprobs is None or s.start >= plen - 1:
                continue
            last = chunk_end[id(s)] if s.num_new > 1 else (req.seat or 0)  # the chunk's last row
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
