"""The block manager: the KV pool's budget in blocks, and where each request's blocks sit. Pure Python.

Admission and preemption decide by the budget (`num_blocks`). Placement keeps each running request's blocks
contiguous: the request sits in a seat, a run of `blocks_per_seat` blocks, and holds the first blocks of it, so
its K/V are one view for attention (model/paged_cache.py). The lowest free seat is taken first, which keeps the
seats of a decode batch dense."""

from __future__ import annotations

import heapq

from service.engine.request import Request


class BlockManager:
    """A budget of `num_blocks` blocks of `block_size` tokens over `num_seats` seats of `blocks_per_seat`."""

    def __init__(self, num_blocks: int, block_size: int, num_seats: int | None = None,
                 blocks_per_seat: int | None = None) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_seats = num_seats if num_seats is not None else num_blocks
        self.blocks_per_seat = blocks_per_seat if blocks_per_seat is not None else num_blocks
        self._used = 0
        self._seats = list(range(self.num_seats))  # a heap: the lowest free seat first

    @property
    def num_free(self) -> int:
        return self.num_blocks - self._used

    @property
    def num_free_seats(self) -> int:
        return len(self._seats)

    @property
    def usage(self) -> float:
        return self._used / self.num_blocks if self.num_blocks else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def can_admit(self, n: int) -> bool:
        """A new request needs a free seat as well as n blocks."""
        return bool(self._seats) and self.can_allocate(n)

    def allocate(self, req: Request, n: int) -> None:
        """Give `req` its next n blocks (seating it first if it has no seat)."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free} free")
        if req.seat is None:
            if not self._seats:
                raise RuntimeError("no free seat")
            req.seat = heapq.heappop(self._seats)
        held = len(req.block_ids)
        if held + n > self.blocks_per_seat:
            raise RuntimeError(f"{held + n} blocks exceed a seat of {self.blocks_per_seat}")
        base = req.seat * self.blocks_per_seat + held
        req.block_ids.extend(range(base, base + n))
        self._used += n

    def allocate_cross(self, req: Request, n: int) -> None:
        """Blocks for a translator's encoder K/V (kept in the seat's cross-attention run)."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free} free")
        req.num_cross_blocks += n
        self._used += n

    def free(self, req: Request) -> None:
        """Give back everything `req` holds, its seat included."""
        self._used -= len(req.block_ids) + req.num_cross_blocks
        req.block_ids.clear()
        req.num_cross_blocks = 0
        if req.seat is not None:
            heapq.heappush(self._seats, req.seat)
            req.seat = None
