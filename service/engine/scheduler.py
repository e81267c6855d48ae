"""Iteration-level (continuous) batching over a paged KV cache. Pure Python: no torch, no web framework.

Every engine step asks `schedule()` which requests run now and how many new tokens each feeds:
running requests decode one token; waiting ones are admitted (prefill) while there are free KV blocks, seats
(`max_num_seqs`) and token budget. When a running request needs a block and none is free, the most recently
arrived running request is preempted: its blocks are freed and it is requeued to be recomputed later."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from service.engine.request import Request, RequestStatus


class BlockManager:
    """The free list of KV blocks; a request's block table is the list of ids it holds."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
        blocks.clear()


@dataclass
class ScheduledRequest:
    """A request in this step's batch, feeding tokens [start, start + num_new) of its decoder sequence."""

    request: Request
    start: int
    num_new: int

    @property
    def is_prefill(self) -> bool:
        return self.start == 0 or self.num_new > 1

    @property
    def encode_source(self) -> bool:
        """A translator request whose encoder must run (first time, or after preemption)."""
        return self.request.is_encoder_decoder and self.start == 0


@dataclass
class SchedulerOutput:
    prefills: list[ScheduledRequest] = field(default_factory=list)
    decodes: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.prefills) + len(self.decodes)


class Scheduler:
    """Waiting and running queues; admission by KV blocks, seats and a per-step token budget; preemption."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def blocks_needed(self, req: Request) -> int:
        """Blocks a request holds when all its tokens so far plus the next one are cached (+ encoder K/V)."""
        cross = self.blocks.blocks_for(len(req.source_ids)) if req.source_ids is not None else 0
        return self.blocks.blocks_for(req.num_tokens + 1) + cross

    def fits_at_all(self, req: Request) -> bool:
        return self.blocks_needed(req) <= self.blocks.num_blocks

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and give its blocks back (finish, abort or error)."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.block_ids)
        self.blocks.free(req.cross_block_ids)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.block_ids)
        self.blocks.free(req.cross_block_ids)
        req.num_computed = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)  # first in line to come back

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # 1. Running requests decode one token; make room by preempting the newest when blocks run out.
        for req in sorted(self.running, key=lambda r: r.arrival_time):
            if req not in self.running:  # preempted below for an older request
                continue
            need = self.blocks.blocks_for(req.num_tokens) - len(req.block_ids)
            while need > 0 and not self.blocks.can_allocate(need):
                victim = max(self.running, key=lambda r: r.arrival_time)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req not in self.running:
                continue
            if need > 0:
                req.block_ids.extend(self.blocks.allocate(need))
            out.decodes.append(ScheduledRequest(req, req.num_computed, req.num_tokens - req.num_computed))
            budget -= 1
        # 2. Admit waiting requests first come, first served, while blocks, seats and budget last.
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            num_new = req.num_tokens
            if out.prefills and num_new > budget:
                break
            cross = self.blocks.blocks_for(len(req.source_ids)) if req.source_ids is not None else 0
            need = self.blocks.blocks_for(num_new + 1) + cross
            if not self.blocks.can_allocate(need):
                break
            self.waiting.popleft()
            req.block_ids = self.blocks.allocate(need - cross)
            req.cross_block_ids = self.blocks.allocate(cross)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.prefills.append(ScheduledRequest(req, 0, num_new))
            budget -= num_new
        return out
