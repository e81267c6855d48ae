"""Automatic prefix caching: which computed KV blocks hold which tokens. Pure Python.

A full block is named by a hash chain, as vLLM's automatic prefix caching names it: the name of block j is the
hash of block j - 1's name and block j's token ids, so two requests whose first j blocks hold the same tokens
name them alike. A translator's chain starts from its source sentence (its decoder K/V depend on it), a language
model's from nothing. Names are BLAKE2b digests of 128 bits: a collision (two different prefixes sharing K/V)
is as unlikely as one in a content-addressed store.

A block is registered once every token in it has been computed; it stays findable after its request leaves,
until the block manager hands the block to another request (a later request names it in its block table and
reads it where it lies). A block a running request will compute is
`pending`: a request whose next block is pending waits for it rather than computing it a second time (how `n`
choices of one prompt, or a burst of requests behind one system prompt, hold the shared part once).

A block that is not full cannot be shared (its owner keeps writing into it), but its computed first tokens can
be copied: a `Partial` records them, under the name of the block before it, and a request that starts with
the same tokens there has them copied into its own block (copy on write) and computes only the rest; where
the block is free and comes back to it, nothing is copied. That is how `n` choices and beam hypotheses diverge: they share
every full block and copy the one they diverge in."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from service.engine.request import Request


def _digest(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def root_name(req: Request) -> bytes:
    """The name a chain starts from: nothing for a language model, the source for a translator."""
    return _digest(b"source", req.source_ids) if req.source_ids is not None else b""


def block_names(req: Request, names: list[bytes], block_size: int, count: int) -> list[bytes]:
    """The names of req's first `count` full blocks. `names` holds those named so far (its `BlockTable`'s,
    service/engine/blocks.py) and is extended in place as its tokens grow."""
    if len(names) < count:
        ids = req.all_ids
        root = root_name(req)
        for j in range(len(names), count):
            names.append(_digest(names[-1] if names else root, ids[j * block_size : (j + 1) * block_size]))
    return names[:count]


@dataclass(frozen=True)
class Match:
    """The leading blocks of a request already computed somewhere in the pool; `waits`: the next one is being
    computed by a running request, so the request should wait a step rather than compute it again."""

    blocks: tuple[int, ...] = ()
    waits: bool = False
    partial: tuple[int, int] | None = None  # (block, tokens): the next block's first tokens, computed elsewhere


@dataclass
class Partial:
    """The computed first tokens of block `block` (positions start..): read from its running owner, or kept
    when the owner left or the block filled."""

    block: int
    start: int
    end: int
    first: int  # its first token, to pass over most candidates at once
    owner: Request | None
    tokens: tuple[int, ...] = ()

    def computed(self) -> list[int]:
        o = self.owner
        if o is None:
            return list(self.tokens)
        end, p = min(o.num_computed, self.end), len(o.prompt_ids)
        if end <= p:
            return o.prompt_ids[self.start : end]
        head = o.prompt_ids[self.start :] if self.start < p else []
        return head + o.output_ids[max(0, self.start - p) : end - p]

    def freeze(self) -> None:
        if self.owner is not None:
            self.tokens, self.owner = tuple(self.computed()), None


class PrefixCache:
    """Block name <-> block id, for computed blocks and for blocks being computed; hit counters in tokens."""

    def __init__(self) -> None:
        self.computed: dict[bytes, int] = {}
        self.name_of: dict[int, bytes] = {}
        self.pending: dict[bytes, int] = {}
        self.partials: dict[bytes, dict[int, Partial]] = {}  # the name before -> block -> its computed start
        self.partial_parent: dict[int, bytes] = {}
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

    def offer(self, parent: bytes, part: Partial) -> None:
        """A block being filled after the block named `parent`: its computed tokens may be copied."""
        if part.block not in self.partial_parent:
            self.partials.setdefault(parent, {})[part.block] = part
            self.partial_parent[part.block] = parent

    def freeze(self, block: int) -> None:
        """The block's owner leaves it (or filled it): keep the tokens it computed there."""
        parent = self.partial_parent.get(block)
        if parent is not None:
            self.partials[parent][block].freeze()

    def best_partial(self, parent: bytes, tokens: list[int]) -> tuple[int, int] | None:
        """(block, n): the block after `parent` whose computed tokens start with the most of `tokens` (n >= 1)."""
        best: tuple[int, int] | None = None
        for block, part in self.partials.get(parent, {}).items():
            if part.first != tokens[0]:
                continue
            n = 0
            for a, b in zip(part.computed(), tokens, strict=False):
                if a != b:
                    break
                n += 1
            if n and (best is None or n > best[1]):
                best = (block, n)
        return best

    def evict(self, block: int) -> None:
        """The block's place is about to be overwritten: it no longer holds its name or its partial tokens."""
        parent = self.partial_parent.pop(block, None)
        if parent is not None:
            del self.partials[parent][block]
            if not self.partials[parent]:
                del self.partials[parent]
        name = self.name_of.pop(block, None)
        if name is not None and self.computed.get(name) == block:
            del self.computed[name]

    def count(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit
