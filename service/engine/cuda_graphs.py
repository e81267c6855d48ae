"""CUDA graphs for decode steps: the decode forward captured once per padded (seats, context) bucket and
replayed, so a decode step costs one graph launch instead of hundreds of kernel launches from Python.

A step that only decodes (every scheduled request feeds one token, none asks for attention rows) is padded to
the smallest bucket holding its highest seat and its longest context: padding rows write to the null seat and
are never sampled. The graph reads the persistent input buffers (the same storage every step) and the mask is
computed inside it from their context lengths, so a replay needs nothing but the step's one input copy.
Without CUDA (or with `graphs=False`) the same padded forward runs eagerly, which is how the padding is tested
on a CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.masks import length_mask
from model.paged_cache import StepLayout

if TYPE_CHECKING:
    from service.engine.runner import ModelRunner
    from service.engine.scheduler import ScheduledRequest


def buckets(limit: int, first: int) -> list[int]:
    """first, 2 first, 4 first, ... up to and including limit."""
    out, b = [], first
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


class DecodeGraphs:
    """Captured decode forwards keyed by (seats, context) bucket, captured on first use or by `capture_all`."""

    def __init__(self, runner: ModelRunner, num_seats: int, seat_len: int, graphs: bool = True) -> None:
        self.runner = runner
        self.seat_buckets = buckets(num_seats, 1)
        self.len_buckets = buckets(seat_len, min(64, seat_len))
        self.use_graphs = graphs and runner.device.type == "cuda"
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool_handle = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def bucket(self, plan: list[ScheduledRequest]) -> tuple[int, int] | None:
        """The (seats, context) bucket of a decode-only plan whose rows share no block; None for any other."""
        if not plan or any(s.num_new != 1 or s.encode_source or s.request.seat is None or s.request.shared_runs
                           for s in plan):
            return None
        seats = max(s.request.seat or 0 for s in plan) + 1
        longest = max(s.start + 1 for s in plan)
        return (next(b for b in self.seat_buckets if b >= seats), next(b for b in self.len_buckets if b >= longest))

    def _layout(self, key: tuple[int, int]) -> StepLayout:
        seats, length = key
        d = self.runner.inputs.d
        return StepLayout(d["slots"][:seats], seats, length, length_mask(d["decode_lens"][:seats], length))

    def run(self, key: tuple[int, int]) -> Tensor:
        """Hidden states (seats, d_model) of the padded decode rows."""
        if not self.use_graphs:
            return self.runner.forward_decode(key[0], self._layout(key))
        if key not in self.graphs:
            self._capture(key)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, key: tuple[int, int]) -> None:
        seats, _ = key
        d, pool = self.runner.inputs.d, self.runner.pool
        d["slots"][:seats].fill_(pool.slot(pool.null_seat, 0))  # capture runs write to the null seat only
        d["decode_lens"][:seats].fill_(1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels and allocator outside the capture, as PyTorch advises
            for _ in range(2):
                self.runner.forward_decode(seats, self._layout(key))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool_handle):
            out = self.runner.forward_decode(seats, self._layout(key))
        self.graphs[key] = (graph, out)

    def capture_all(self) -> int:
        """Capture every bucket now (at start-up), largest first so smaller ones reuse the memory pool."""
        if not self.use_graphs:
            return 0
        for seats in reversed(self.seat_buckets):
            for length in reversed(self.len_buckets):
                if (seats, length) not in self.graphs:
                    self._capture((seats, length))
        return len(self.graphs)
