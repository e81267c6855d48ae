"""CUDA graphs for decode steps: the decode forward captured once per padded (rows, context) bucket and
replayed, so a decode step costs one graph launch instead of hundreds of kernel launches from Python.

A step that only decodes (every scheduled request feeds one token, none asks for attention rows) is padded to
the smallest bucket holding its rows and its longest context: padding rows write to the null block, their
tables name only the null block, and they are never sampled. The graph reads the persistent input buffers (the same storage every step: tokens, slots,
block tables of the bucket's width, context lengths) and the mask is computed inside it from the lengths, so a replay needs nothing but the step's one input copy.
Without CUDA (or with `graphs=False`) the same padded forward runs eagerly, which is how the padding is tested
on a CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.paged_cache import StepLayout
from service.engine.inputs import StepInputs

if TYPE_CHECKING:
    from service.engine.scheduler import ScheduledRequest

Forward = Callable[[int, StepLayout], Tensor]  # (rows, layout) -> hidden states of the rows


def buckets(limit: int, first: int) -> list[int]:
    """first, 2 first, 4 first, ... up to and including limit."""
    out, b = [], first
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


class DecodeGraphs:
    """Captured decode forwards keyed by (rows, context) bucket, captured on first use or by `capture_all`."""

    def __init__(self, forward: Forward, inputs: StepInputs, max_rows: int, max_len: int, graphs: bool = True) -> None:
        self.forward, self.inputs, self.pool = forward, inputs, inputs.pool
        self.row_buckets = buckets(max_rows, 1)
        self.len_buckets = buckets(max_len, min(64, max_len))
        self.use_graphs = graphs and inputs.device.type == "cuda"
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool_handle = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def bucket(self, plan: list[ScheduledRequest]) -> tuple[int, int] | None:
        """The (rows, context) bucket of a decode-only plan; None for any other."""
        if not plan or any(s.num_new != 1 or s.encode_source for s in plan):
            return None
        longest = max(s.start + 1 for s in plan)
        return (next(b for b in self.row_buckets if b >= len(plan)),
                next(b for b in self.len_buckets if b >= longest))

    def _layout(self, key: tuple[int, int]) -> StepLayout:
        rows, length = key
        inputs = self.inputs
        d, width = inputs.d, -(-length // self.pool.block_size)
        return StepLayout(d["slots"][:rows], inputs.table_view(rows, width), d["row_table"][:rows],
                          d["context_lens"][:rows], rows, length)

    def run(self, key: tuple[int, int]) -> Tensor:
        """Hidden states (rows, d_model) of the padded decode rows."""
        if not self.use_graphs:
            return self.forward(key[0], self._layout(key))
        if key not in self.graphs:
            self._capture(key)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, key: tuple[int, int]) -> None:
        rows, length = key
        inputs, pool = self.inputs, self.pool
        d = inputs.d
        d["slots"][:rows].fill_(pool.slot(pool.null_block, 0))  # capture runs write to the null block only
        d["context_lens"][:rows].fill_(1)
        d["row_table"][:rows].copy_(torch.arange(rows, device=d["row_table"].device))
        inputs.table_view(rows, -(-length // pool.block_size)).fill_(pool.null_block)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels and allocator outside the capture, as PyTorch advises
            for _ in range(2):
                self.forward(rows, self._layout(key))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool_handle):
            out = self.forward(rows, self._layout(key))
        self.graphs[key] = (graph, out)

    def capture_all(self) -> int:
        """Capture every bucket now (at start-up), largest first so smaller ones reuse the memory pool."""
        if not self.use_graphs:
            return 0
        for rows in reversed(self.row_buckets):
            for length in reversed(self.len_buckets):
                if (rows, length) not in self.graphs:
                    self._capture((rows, length))
        return len(self.graphs)
