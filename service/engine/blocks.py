"""The block manager: the KV pool's blocks, each request's block table, and which blocks requests share.
Pure Python.

A request's keys and values live in blocks of `block_size` tokens anywhere in the pool: its table's
`block_ids[j]` holds its tokens [j * block_size, (j + 1) * block_size) (vLLM's `req_to_blocks`); attention reads
them in place through that table (model/paged_cache.py). Admission and preemption decide by the budget: a block
counts while some request references it. A request shares its first `own_start` blocks with the requests that
computed them (prefix caching, `n` choices of one prompt): those ids sit in its table like its own, referenced,
never copied. A request that starts inside a block computed elsewhere gets the tokens in common copied into its
first own block (copy on write: `admit` returns the copy for the runner; `num_copied` counts them).

Free blocks wait in two places: blocks holding nothing reusable, handed out first and most recently freed first
(memory already touched stays in use: the pool's pages are allocated lazily), and blocks that still hold a
prefix-cache name (service/engine/prefix_cache.py), handed out least recently freed first when no other is left;
a cached block found again by a new request leaves its queue (revived). A request also takes a `slot`,
its row among at most `num_slots` running requests: a translator's encoder K/V are kept per slot."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from service.engine.prefix_cache import Match, Partial, PrefixCache, block_names, root_name
from service.engine.request import Request


@dataclass
class BlockTable:
    """What one request holds in the KV pool, owned by the `BlockManager` (one per request id); the scheduler
    hands it to the runner with each scheduled chunk (`ScheduledRequest.table`) to read, never to change."""

    block_ids: list[int] = field(default_factory=list)  # block j holds its tokens [j * bs, (j + 1) * bs)
    num_cross_blocks: int = 0  # budget taken by a translator's encoder K/V (kept in its slot, not in blocks)
    slot: int | None = None  # its row among the running requests (a translator's encoder K/V are kept per slot)
    own_start: int = 0  # its first own block; the ones before are shared
    block_names: list[bytes] = field(default_factory=list)  # prefix-cache names of its full blocks so far
    num_committed: int = 0  # blocks named in the prefix cache
    partial_at: int = -1  # the block it is filling, offered for copying (service/engine/prefix_cache.py)
    encoded: bool = False  # a translator's encoder K/V are in its slot


class BlockManager:
    """A budget of `num_blocks` blocks of `block_size` tokens and `num_slots` request slots, and the `BlockTable`
    of each request by request id, from the first time it looks the request up (`match`, `admit`) until the
    request leaves (`free`: finished, aborted or failed). A preempted request keeps a table holding only its
    block names (its tokens stay the same: they are not hashed again), as does a waiting request once matched:
    no block, no slot."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int | None = None,
                 prefix_caching: bool = False) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_slots = num_slots if num_slots is not None else num_blocks
        self.cache = PrefixCache() if prefix_caching else None
        self._used = self._shared = 0
        self._ref = [0] * num_blocks
        self._free_plain = list(range(num_blocks - 1, -1, -1))  # a stack: the most recently freed first
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._free_slots = list(range(self.num_slots - 1, -1, -1))  # pop() gives the lowest
        self._tables: dict[str, BlockTable] = {}  # request id -> what it holds
        self.num_copied = 0  # copy-on-write block copies handed to the runner (never one at decode)

    @property
    def num_free(self) -> int:
        return self.num_blocks - self._used

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_shared(self) -> int:
        """Blocks that more than one request references now."""
        return self._shared

    @property
    def num_tables(self) -> int:
        """Requests the manager keeps a table for (none once every request has left)."""
        return len(self._tables)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def references(self, block: int) -> int:
        return self._ref[block]

    # --- a request's table ----------------------------------------------------------------------------------------

    def table(self, req: Request) -> BlockTable:
        """req's table: every running request has one (and a preempted or matched waiting one); KeyError for a
        request the manager never looked up or that has left."""
        return self._tables[req.request_id]

    def block_ids(self, req: Request) -> list[int]:
        """The blocks req holds, in its token order ([] when it holds none)."""
        t = self._tables.get(req.request_id)
        return t.block_ids if t is not None else []

    def slot(self, req: Request) -> int | None:
        """Its slot while it runs, else None."""
        t = self._tables.get(req.request_id)
        return t.slot if t is not None else None

    def holds(self, req: Request) -> bool:
        """req holds a block, encoder budget or a slot."""
        t = self._tables.get(req.request_id)
        return t is not None and bool(t.block_ids or t.num_cross_blocks or t.slot is not None)

    def _table(self, req: Request) -> BlockTable:
        t = self._tables.get(req.request_id)
        if t is None:
            t = self._tables[req.request_id] = BlockTable()
        return t

    # --- admission ------------------------------------------------------------------------------------------------

    def match(self, req: Request) -> Match:
        """The request's leading blocks already in the pool. Never all of its tokens: the last one is computed
        again for its logits (a block-aligned prompt recomputes its last block)."""
        if self.cache is None or req.attention is not None or req.params.prompt_logprobs is not None:
            return Match()
        full = (req.num_tokens - 1) // self.block_size
        names = block_names(req, self._table(req).block_names, self.block_size, full)
        found = self.cache.lookup(names)
        m = len(found.blocks)
        if found.waits:
            return found
        rest = req.all_ids[m * self.block_size : min((m + 1) * self.block_size, req.num_tokens - 1)]
        partial = self.cache.best_partial(names[m - 1] if m else root_name(req), rest) if rest else None
        return Match(found.blocks, False, partial)

    def can_admit(self, match: Match, num_tokens: int, cross: int = 0) -> bool:
        """A slot is free, and the first num_tokens (the matched blocks included) and `cross` encoder blocks fit
        the budget now."""
        revived = sum(1 for b in match.blocks if self._ref[b] == 0)
        need = self.blocks_for(num_tokens) - len(match.blocks) + revived + cross
        return bool(self._free_slots) and self.can_allocate(need)

    def admit(self, req: Request, match: Match, num_tokens: int) -> tuple[int, int, int] | None:
        """Give req a slot, reference its matched blocks, and allocate its own up to num_tokens. Returns the copy
        to make before the step, (from block, to block, tokens), when it starts inside a block computed elsewhere."""
        t = self._table(req)
        t.slot = self._free_slots.pop()
        for b in match.blocks:
            self._hold(b)
        t.block_ids = list(match.blocks)
        t.own_start = t.num_committed = len(match.blocks)
        req.num_computed = len(match.blocks) * self.block_size
        if self.cache is not None:
            self.cache.count(req.num_tokens, req.num_computed + (match.partial[1] if match.partial else 0))
        self.allocate(req, self.blocks_for(num_tokens) - len(t.block_ids))
        if match.partial is None:
            return None
        source, n = match.partial
        req.num_computed += n
        dest = t.block_ids[t.own_start]
        if source == dest:  # it was free and came back to us as it is: nothing to copy
            return None
        self.num_copied += 1
        return source, dest, n

    # --- a request's own blocks -----------------------------------------------------------------------------------

    def allocate(self, req: Request, n: int) -> None:
        """Give `req` (admitted) its next n blocks: unnamed free blocks first, then the least recently freed named
        ones."""
        if n <= 0:
            return
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free} free")
        t = self._tables[req.request_id]
        held = len(t.block_ids)
        for _ in range(n):
            b = self._free_plain.pop() if self._free_plain else self._free_cached.popitem(last=False)[0]
            if self.cache is not None:
                self.cache.evict(b)  # its new owner will write here
            self._hold(b)
            t.block_ids.append(b)
        if self.cache is not None:  # prompt blocks this request will compute: others may wait for them
            full = min(held + n, len(req.prompt_ids) // self.block_size)
            for j, name in enumerate(block_names(req, t.block_names, self.block_size, full)[held:], start=held):
                self.cache.expect(name, t.block_ids[j])

    def allocate_cross(self, req: Request, n: int) -> None:
        """Budget for an admitted translator's encoder K/V (kept per slot, outside the blocks)."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free} free")
        self._tables[req.request_id].num_cross_blocks += n
        self._used += n

    def commit(self, req: Request) -> None:
        """Name the request's own blocks that are now fully computed, so later requests can reuse them."""
        if self.cache is None or req.attention is not None:
            return
        t = self._tables[req.request_id]
        full = min(req.num_computed // self.block_size, len(t.block_ids))
        if full == t.num_committed and (t.partial_at == full or not req.num_computed % self.block_size):
            return
        names, bs = block_names(req, t.block_names, self.block_size, full), self.block_size
        first = max(t.num_committed, t.own_start)
        ids = req.all_ids[first * bs : full * bs] if full > first else []
        for j in range(first, full):
            self.cache.register(names[j], t.block_ids[j])
            if j == t.partial_at:  # the block it was filling is full: what it holds is fixed
                self.cache.freeze(t.block_ids[j])
            else:  # a request diverging inside it can copy the tokens it has in common
                tokens = tuple(ids[(j - first) * bs : (j - first + 1) * bs])
                self.cache.offer(names[j - 1] if j else root_name(req),
                                 Partial(t.block_ids[j], j * bs, (j + 1) * bs, tokens[0], None, tokens))
        t.num_committed = full
        j = full
        if req.num_computed % bs and j < len(t.block_ids) and t.partial_at != j:
            p = len(req.prompt_ids)
            token = req.prompt_ids[j * bs] if j * bs < p else req.output_ids[j * bs - p]
            self.cache.offer(names[j - 1] if j else root_name(req),
                             Partial(t.block_ids[j], j * bs, (j + 1) * bs, token, req))
            t.partial_at = j

    def free(self, req: Request, requeued: bool = False) -> None:
        """Give back everything `req` holds, its slot included; its computed blocks stay named until reused. Its
        table goes, unless it is `requeued` (preempted, to be recomputed): then only its block names stay."""
        t = self._tables.pop(req.request_id, None)
        if t is None:
            return
        if self.cache is not None:
            j = t.num_committed
            self.cache.forget_pending(t.block_names[j:], t.block_ids[j:])
            if 0 <= t.partial_at < len(t.block_ids):
                self.cache.freeze(t.block_ids[t.partial_at])
        for b in reversed(t.block_ids):  # a sequence's tail is evicted before its head
            self._release(b)
        self._used -= t.num_cross_blocks
        if t.slot is not None:
            self._free_slots.append(t.slot)
        if requeued:
            self._tables[req.request_id] = BlockTable(block_names=t.block_names)

    def forget(self, req: Request) -> list[int]:
        """The request's own blocks may hold NaN: none of them keeps a name. Returns them (to be zeroed)."""
        t = self._tables[req.request_id]
        own = t.block_ids[t.own_start :]
        if self.cache is not None:
            for b in own:
                self.cache.evict(b)
        return own

    def _hold(self, block: int) -> None:
        if self._ref[block] == 0:
            self._used += 1
            if block in self._free_cached:  # found again by its name
                del self._free_cached[block]
        elif self._ref[block] == 1:
            self._shared += 1
        self._ref[block] += 1

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 1:
            self._shared -= 1
        elif self._ref[block] == 0:
            self._used -= 1
            named = self.cache is not None and block in self.cache.name_of
            if named:
                self._free_cached[block] = None
            else:
                self._free_plain.append(block)
