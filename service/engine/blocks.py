"""The block manager: the KV pool's budget in blocks, where each request's blocks sit, and which it shares.
Pure Python.

Admission and preemption decide by the budget (`num_blocks`): a block counts while some request references it.
Placement: a request sits in a seat, a run of `blocks_per_seat` blocks, and block j of its sequence always lies
at position j of some seat (block id = seat * blocks_per_seat + j). Its own blocks are those of its seat from
`own_start` on; the blocks before `own_start` it shares, where they lie, with the requests that computed them
(prefix caching, `n` choices of one prompt). A request that starts inside a block computed elsewhere gets the
tokens in common copied into its own block (copy on write: `admit` returns the copy for the runner). A request
that finds its whole cached prefix in a free seat takes that seat (nothing to share or copy). Reference counts keep a shared block from being overwritten: a seat is given to a
new request only if no block at or past where the new request starts writing is referenced.

Freed blocks keep their names (service/engine/prefix_cache.py) until their place is written again. The seat of
a new request: without prefix caching, the lowest free seat (it keeps decode batches dense); with it, the lowest
free seat holding nothing cached inside the span of running seats, else the least recently freed one inside
that span (evicting its blocks), else the lowest free seat past it."""

from __future__ import annotations

from service.engine.prefix_cache import Match, Partial, PrefixCache, block_names, root_name
from service.engine.request import Request


class BlockManager:
    """A budget of `num_blocks` blocks of `block_size` tokens over `num_seats` seats of `blocks_per_seat`."""

    def __init__(self, num_blocks: int, block_size: int, num_seats: int | None = None,
                 blocks_per_seat: int | None = None, prefix_caching: bool = False) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_seats = num_seats if num_seats is not None else num_blocks
        self.blocks_per_seat = blocks_per_seat if blocks_per_seat is not None else num_blocks
        self.cache = PrefixCache() if prefix_caching else None
        self._used = self._shared = 0
        self._ref = [0] * (self.num_seats * self.blocks_per_seat)
        self._refs_in = [0] * self.num_seats  # referenced blocks per seat
        self._occupant: list[Request | None] = [None] * self.num_seats
        self._freed_at = [0] * self.num_seats  # a tick per seat freed: least recently freed first
        self._tick = 0

    @property
    def num_free(self) -> int:
        return self.num_blocks - self._used

    @property
    def num_free_seats(self) -> int:
        return self._occupant.count(None)

    @property
    def num_shared(self) -> int:
        """Blocks that more than one request references now."""
        return self._shared

    @property
    def usage(self) -> float:
        return self._used / self.num_blocks if self.num_blocks else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def references(self, block: int) -> int:
        return self._ref[block]

    # --- admission ------------------------------------------------------------------------------------------------

    def match(self, req: Request) -> Match:
        """The request's leading blocks already in the pool. Never all of its tokens: the last one is computed
        again for its logits (a block-aligned prompt recomputes its last block)."""
        if self.cache is None or req.attention is not None or req.params.prompt_logprobs is not None:
            return Match()
        names = block_names(req, self.block_size, (req.num_tokens - 1) // self.block_size)
        found = self.cache.lookup(names)
        m = len(found.blocks)
        if found.waits:
            return found
        rest = req.all_ids[m * self.block_size : min((m + 1) * self.block_size, req.num_tokens - 1)]
        partial = self.cache.best_partial(names[m - 1] if m else root_name(req), rest) if rest else None
        return Match(found.blocks, False, partial)

    def seat_for(self, req: Request, match: Match, num_tokens: int, cross: int = 0) -> int | None:
        """A seat for req if its first num_tokens (the matched blocks included) and `cross` encoder blocks fit
        the budget now; None otherwise."""
        revived = sum(1 for b in match.blocks if self._ref[b] == 0)
        if not self.can_allocate(self.blocks_for(num_tokens) - len(match.blocks) + revived + cross):
            return None
        seat = self._takeover(match)
        return seat if seat is not None else self._pick_seat(len(match.blocks))

    def admit(self, req: Request, match: Match, seat: int, num_tokens: int) -> tuple[int, int, int, int] | None:
        """Seat req, reference its matched blocks, and give it own blocks up to num_tokens. Returns the copy to
        make before the step, (from seat, to seat, first position, tokens), when it starts inside a block
        computed elsewhere."""
        taken = self._takeover(match) == seat
        req.seat, req.own_start = seat, 0 if taken else len(match.blocks)
        self._occupant[seat] = req
        for b in match.blocks:
            self._hold(b)
        req.block_ids = list(match.blocks)
        req.shared_runs = self._runs(match.blocks[: req.own_start])
        req.num_committed = len(match.blocks)
        req.num_computed = len(match.blocks) * self.block_size
        copy = None
        if match.partial is not None:
            source, n = match.partial
            if not taken:
                copy = (source // self.blocks_per_seat, seat, req.num_computed, n)
            req.num_computed += n
        if self.cache is not None:
            base = seat * self.blocks_per_seat
            for j in range(len(match.blocks), self.blocks_per_seat):
                self.cache.evict(base + j)  # the new occupant will write here
            self.cache.count(req.num_tokens, req.num_computed)
        self.allocate(req, self.blocks_for(num_tokens) - len(req.block_ids))
        return copy

    def _runs(self, blocks: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
        """Consecutive shared blocks of one seat as (seat, first token, end token)."""
        runs: list[tuple[int, int, int]] = []
        for j, b in enumerate(blocks):
            seat = b // self.blocks_per_seat
            if runs and runs[-1][0] == seat:
                runs[-1] = (seat, runs[-1][1], (j + 1) * self.block_size)
            else:
                runs.append((seat, j * self.block_size, (j + 1) * self.block_size))
        return tuple(runs)

    def _takeover(self, match: Match) -> int | None:
        """The free seat that holds all of the matched blocks (and the partial one) at its start, if no other
        request needs more of it."""
        held = match.blocks + ((match.partial[0],) if match.partial is not None else ())
        if not held:
            return None
        seat = held[0] // self.blocks_per_seat
        base = seat * self.blocks_per_seat
        if self._occupant[seat] is not None or held != tuple(range(base, base + len(held))):
            return None
        return seat if self._writable(seat, len(match.blocks)) else None

    def _writable(self, seat: int, start: int) -> bool:
        """No request references a block of `seat` at position `start` or later."""
        if not self._refs_in[seat]:
            return True
        base = seat * self.blocks_per_seat
        return not any(self._ref[base + start : base + self.blocks_per_seat])

    def _pick_seat(self, own_start: int) -> int | None:
        free = [s for s in range(self.num_seats) if self._occupant[s] is None and self._writable(s, own_start)]
        if not free or self.cache is None:
            return free[0] if free else None
        span = max((s + 1 for s, r in enumerate(self._occupant) if r is not None), default=0)
        inside = [s for s in free if s < span]
        if not inside:
            return free[0]
        base = self.blocks_per_seat
        empty = [s for s in inside if not any(self.cache.name_of.get(s * base + j) is not None
                                              for j in range(own_start, base))]
        return empty[0] if empty else min(inside, key=lambda s: self._freed_at[s])

    # --- a request's own blocks -----------------------------------------------------------------------------------

    def allocate(self, req: Request, n: int) -> None:
        """Give `req` its next n blocks, in its seat."""
        if n <= 0:
            return
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free} free")
        assert req.seat is not None, "a request is seated by admit()"
        held = len(req.block_ids)
        if held + n > self.blocks_per_seat:
            raise RuntimeError(f"{held + n} blocks exceed a seat of {self.blocks_per_seat}")
        base = req.seat * self.blocks_per_seat
        new = list(range(base + held, base + held + n))
        for b in new:
            if self.cache is not None:
                self.cache.evict(b)
            self._hold(b)
        req.block_ids.extend(new)
        if self.cache is not None:  # prompt blocks this request will compute: others may wait for them
            full = min(held + n, len(req.prompt_ids) // self.block_size)
            for j, name in enumerate(block_names(req, self.block_size, full)[held:], start=held):
                self.cache.expect(name, req.block_ids[j])

    def allocate_cross(self, req: Request, n: int) -> None:
        """Blocks for a translator's encoder K/V (kept in the seat's cross-attention run)."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free} free")
        req.num_cross_blocks += n
        self._used += n

    def commit(self, req: Request) -> None:
        """Name the request's own blocks that are now fully computed, so later requests can reuse them."""
        if self.cache is None or req.attention is not None:
            return
        full = min(req.num_computed // self.block_size, len(req.block_ids))
        if full == req.num_committed and (req.partial_at == full or not req.num_computed % self.block_size):
            return
        names, bs = block_names(req, self.block_size, full), self.block_size
        first = max(req.num_committed, req.own_start)
        ids = req.all_ids[first * bs : full * bs] if full > first else []
        for j in range(first, full):
            self.cache.register(names[j], req.block_ids[j])
            if j == req.partial_at:  # the block it was filling is full: what it holds is fixed
                self.cache.freeze(req.block_ids[j])
            else:  # a request diverging inside it can copy the tokens it has in common
                tokens = tuple(ids[(j - first) * bs : (j - first + 1) * bs])
                self.cache.offer(names[j - 1] if j else root_name(req),
                                 Partial(req.block_ids[j], j * bs, (j + 1) * bs, tokens[0], None, tokens))
        req.num_committed = full
        j = full
        if req.num_computed % bs and j < len(req.block_ids) and req.partial_at != j:
            p = len(req.prompt_ids)
            token = req.prompt_ids[j * bs] if j * bs < p else req.output_ids[j * bs - p]
            self.cache.offer(names[j - 1] if j else root_name(req),
                             Partial(req.block_ids[j], j * bs, (j + 1) * bs, token, req))
            req.partial_at = j
    def free(self, req: Request) -> None:
        """Give back everything `req` holds, its seat included; its computed blocks stay named."""
        if self.cache is not None:
            j = req.num_committed
            self.cache.forget_pending(req.block_names[j:], req.block_ids[j:])
            if 0 <= req.partial_at < len(req.block_ids):
                self.cache.freeze(req.block_ids[req.partial_at])
        for b in req.block_ids:
            self._release(b)
        self._used -= req.num_cross_blocks
        req.block_ids = []
        req.num_cross_blocks = req.num_committed = req.own_start = 0
        req.partial_at = -1
        req.shared_runs = ()
        req.encoded = False
        if req.seat is not None:
            self._occupant[req.seat] = None
            self._tick += 1
            self._freed_at[req.seat] = self._tick
            req.seat = None

    def forget_seat(self, seat: int) -> None:
        """The seat's K/V were zeroed (a request's logits went NaN): none of its blocks holds its name now."""
        if self.cache is not None:
            for j in range(self.blocks_per_seat):
                self.cache.evict(seat * self.blocks_per_seat + j)

    def _hold(self, block: int) -> None:
        if self._ref[block] == 0:
            self._used += 1
            self._refs_in[block // self.blocks_per_seat] += 1
        elif self._ref[block] == 1:
            self._shared += 1
        self._ref[block] += 1

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 1:
            self._shared -= 1
        elif self._ref[block] == 0:
            self._used -= 1
            self._refs_in[block // self.blocks_per_seat] -= 1
