"""Automatic prefix caching: which computed KV blocks hold which tokens. Pure Python.

A full block is named by a hash chain, as vLLM's automatic prefix caching names it: the name of block j is the
hash of block j - 1's name and block j's token ids, so two requests whose first j blocks hold the same tokens
name them alike. A translator's chain starts from its source sentence (its decoder K/V depend on it), a language
model's from nothing. Names are BLAKE2b digests of 128 bits: a collision (two different prefixes sharing K/V)
is as unlikely as one in a content-addressed store.

A block is registered once every token in it has been computed; it stays findable after its request leaves,
until the block manager hands its place to another request (model/paged_cache.py keeps each block at its
position in some seat, so a block is reused where it lies). A block a running request will compute is
`pending`: a request whose next block is pending waits for it rather than computing it a second time (how `n`
choices of one prompt, or a burst of requests behind one system prompt, hold the shared part once)."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from service.engine.request import Request


def _digest(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def block_names(req: Request, block_size: int, count: int) -> list[bytes]:
    """The names of req's first `count` full blocks (kept on the request, extended as its tokens grow)."""
    names = req.block_names
    if len(names) < count:
        ids = req.all_ids
        root = _digest(b"source", req.source_ids) if req.source_ids is not None else b""
        for j in range(len(names), count):
            names.append(_digest(names[-1] if names else root, ids[j * block_size : (j + 1) * block_size]))
    return names[:count]


@dataclass(frozen=True)
class Match:
    """The leading blocks of a request already computed somewhere in the pool; `waits`: the next one is being
    computed by a running request, so the request should wait a step rather than compute it again."""

    blocks: tuple[int, ...] = ()
    waits: bool = False


class PrefixCache:
    """Block name <-> block id, for computed blocks and for blocks being computed; hit counters in tokens."""

    def __init__(self) -> None:
        self.computed: dict[bytes, int] = {}
        self.name_of: dict[int, bytes] = {}
        self.pending: dict[bytes, int] = {}
        self.queries = 0  # tokens looked up (each admitted request's known tokens), vLLM's prefix_cache_queries
        self.hits = 0  # of which found computed

    def lookup(self, names: list[bytes]) -> Match:
        blocks: list[int] = []
        for name in names:
            block = self.computed.get(name)
            if block is None:
                return Match(tuple(blocks), name in self.pending)
            blocks.append(block)
        return Match(tuple(blocks))

    def expect(self, name: bytes, block: int) -> None:
        """`block` will hold the block named `name` once its request computes it."""
        self.pending.setdefault(name, block)

    def register(self, name: bytes, block: int) -> None:
        """`block` now holds computed K/V for `name` (a second copy of a known name stays anonymous)."""
        if self.pending.get(name) == block:
            del self.pending[name]
        if name not in self.computed:
            self.computed[name] = block
            self.name_of[block] = name

    def forget_pending(self, names: list[bytes], blocks: list[int]) -> None:
        """A request left before computing these blocks."""
        for name, block in zip(names, blocks, strict=False):
            if self.pending.get(name) == block:
                del self.pending[name]

    def evict(self, block: int) -> bool:
        """The block's place is about to be overwritten: it no longer holds its name. True if it held one."""
        name = self.name_of.pop(block, None)
        if name is None:
            return False
        if self.computed.get(name) == block:
            del self.computed[name]
        return True

    def count(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit
