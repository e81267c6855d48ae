"""Cached incremental decoding equals the full forward, for both caches and both architectures."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model.kv_cache import BlockPool, ContiguousKVCache, PagedKVCache
from model.layers import DecoderLayer
from model.transformer import DecoderOnlyLM, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
BLOCK = 4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _positions(start: int, end: int, batch: int) -> torch.Tensor:
    return torch.arange(start, end).expand(batch, end - start)


# --- ContiguousKVCache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 4, 2], [12]], ids=["token-by-token", "chunks", "one-shot"])
def test_contiguous_cache_decoder_only(gpt: DecoderOnlyLM, chunks: list[int]) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, gpt.config.vocab_size, (2, sum(chunks)))
    cache = ContiguousKVCache(gpt.config, batch_size=2, max_len=16)
    with torch.no_grad():
        full = gpt(tokens)
        parts, start = [], 0
        for n in chunks:
            parts.append(gpt(tokens[:, start : start + n], _positions(start, start + n, 2), cache=cache))
            start += n
    assert cache.length == tokens.size(1)
    diff = max_diff(torch.cat(parts, dim=1), full)
    assert diff <= TOL, f"cached decoding ({chunks}) differs from the full forward: {diff:.3g}"


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1]], ids=["token-by-token", "chunks"])
def test_contiguous_cache_encoder_decoder(seq2seq: Transformer, chunks: list[int]) -> None:
    torch.manual_seed(1)
    cfg = seq2seq.config
    src = torch.randint(0, cfg.src_vocab_size or cfg.vocab_size, (2, 7))
    src_valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    tgt = torch.randint(0, cfg.vocab_size, (2, sum(chunks)))
    cache = ContiguousKVCache(cfg, batch_size=2, memory_valid=src_valid)
    with torch.no_grad():
        full = seq2seq(src, tgt, src_valid)
        memory = seq2seq.encode(src, src_valid)
        parts, start = [], 0
        for n in chunks:
            hidden = seq2seq.decode(
                tgt[:, start : start + n], _positions(start, start + n, 2), memory=memory, cache=cache
            )
            parts.append(seq2seq.logits(hidden))
            start += n
    diff = max_diff(torch.cat(parts, dim=1), full)
    assert diff <= TOL, f"cached encoder-decoder decoding ({chunks}) differs from the full forward: {diff:.3g}"


def test_contiguous_cache_reorder_follows_beams(gpt: DecoderOnlyLM) -> None:
    torch.manual_seed(2)
    tokens = torch.randint(0, gpt.config.vocab_size, (3, 6))
    cache = ContiguousKVCache(gpt.config, batch_size=3)
    index = torch.tensor([2, 2, 0])
    with torch.no_grad():
        gpt(tokens[:, :5], _positions(0, 5, 3), cache=cache)
        cache.reorder(index)
        step = gpt(tokens[index, 5:], _positions(5, 6, 3), cache=cache)
        full = gpt(tokens[index])
    diff = max_diff(step[:, 0], full[:, -1])
    assert diff <= TOL, f"after reorder the cache does not follow the kept rows: {diff:.3g}"


def test_contiguous_cache_refuses_overflow(gpt: DecoderOnlyLM) -> None:
    cache = ContiguousKVCache(gpt.config, batch_size=1, max_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache full"):
        gpt(torch.zeros(1, 5, dtype=torch.long), _positions(0, 5, 1), cache=cache)


# --- PagedKVCache over a BlockPool ---------------------------------------------------------------------------


class _Pager:
    """Builds PagedKVCache steps for a padded batch from hand-made block tables, as a scheduler would."""

    def __init__(self, pool: BlockPool, tables: list[list[int]]) -> None:
        self.pool, self.tables = pool, tables
        self.lengths = [0] * len(tables)

    @staticmethod
    def slot(table: list[int], pos: int) -> int:
        return table[pos // BLOCK] * BLOCK + pos % BLOCK

    def step(
        self, chunks: list[list[int]], cross_slots: torch.Tensor | None = None, cross_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, PagedKVCache]:
        """tokens (B, T_new) right-padded, positions (B, T_new) and the cache view for one engine step."""
        b, t = len(chunks), max(len(c) for c in chunks)
        ends = [n + len(c) for n, c in zip(self.lengths, chunks, strict=True)]
        span = max(ends)
        tokens = torch.zeros(b, t, dtype=torch.long)
        positions = torch.zeros(b, t, dtype=torch.long)
        read_slots = torch.zeros(b, span, dtype=torch.long)
        mask = torch.zeros(b, 1, t, span, dtype=torch.bool)
        write_rows: list[int] = []
        write_slots: list[int] = []
        for i, (chunk, start, end, table) in enumerate(zip(chunks, self.lengths, ends, self.tables, strict=True)):
            tokens[i, : len(chunk)] = torch.tensor(chunk)
            positions[i, : len(chunk)] = torch.arange(start, end)
            for j in range(len(chunk)):
                write_rows.append(i * t + j)
                write_slots.append(self.slot(table, start + j))
                mask[i, 0, j, : start + j + 1] = True  # causal: everything up to and including itself
            read_slots[i] = self.slot(table, 0)  # padding points at a valid slot; the mask hides it
            read_slots[i, :end] = torch.tensor([self.slot(table, p) for p in range(end)])
        self.lengths = ends
        cache = PagedKVCache(
            self.pool, torch.tensor(write_slots), torch.tensor(write_rows), read_slots, mask, cross_slots, cross_mask
        )
        return tokens, positions, cache

    def owned_slots(self) -> set[int]:
        return {self.slot(t, p) for t, n in zip(self.tables, self.lengths, strict=True) for p in range(n)}


# Two sequences of different lengths, chunked prefill, then a step where they take different token counts.
PROMPTS = [[3, 9, 4, 1, 7, 2, 8], [5, 6, 1]]
STEPS = [[[11], [12, 13]], [[14], [15]]]
TABLES = [[5, 2, 7], [8, 1]]  # non-contiguous blocks, out of order


def _paged_run(
    decode: Callable[[torch.Tensor, torch.Tensor, PagedKVCache], torch.Tensor], pager: _Pager, **cross: torch.Tensor
) -> list[torch.Tensor]:
    per_seq: list[list[torch.Tensor]] = [[], []]
    for chunks in [PROMPTS, *STEPS]:
        tokens, positions, cache = pager.step(chunks, **cross)
        logits = decode(tokens, positions, cache)
        for i, c in enumerate(chunks):
            per_seq[i].append(logits[i, : len(c)])
    return [torch.cat(p) for p in per_seq]


def _sequences() -> list[list[int]]:
    return [p + [tok for step in STEPS for tok in step[i]] for i, p in enumerate(PROMPTS)]


def test_paged_cache_decoder_only(gpt: DecoderOnlyLM) -> None:
    pool = BlockPool(gpt.config, num_blocks=10, block_size=BLOCK)
    pager = _Pager(pool, TABLES)
    with torch.no_grad():
        got = _paged_run(lambda tok, pos, cache: gpt(tok, pos, cache=cache), pager)
        for i, seq in enumerate(_sequences()):
            expected = gpt(torch.tensor([seq]))[0]
            diff = max_diff(got[i], expected)
            assert diff <= TOL, f"paged decoding of sequence {i} differs from its full forward: {diff:.3g}"
    untouched = [s for s in range(pool.k.size(1)) if s not in pager.owned_slots()]
    assert pool.k[:, untouched].abs().sum() == 0, "the cache wrote outside the blocks the tables own"


def test_paged_cache_encoder_decoder(seq2seq: Transformer) -> None:
    torch.manual_seed(3)
    cfg = seq2seq.config
    src_lens = [6, 3]
    src = torch.randint(0, cfg.src_vocab_size or cfg.vocab_size, (2, max(src_lens)))
    src_valid = torch.arange(src.size(1))[None, :] < torch.tensor(src_lens)[:, None]
    pool = BlockPool(cfg, num_blocks=12, block_size=BLOCK)
    cross_tables = [[9, 0], [4]]
    pager = _Pager(pool, TABLES)
    cross_slots = torch.zeros(src.shape, dtype=torch.long)
    for i, (table, n) in enumerate(zip(cross_tables, src_lens, strict=True)):
        cross_slots[i] = _Pager.slot(table, 0)
        cross_slots[i, :n] = torch.tensor([_Pager.slot(table, p) for p in range(n)])
    with torch.no_grad():
        memory = seq2seq.encode(src, src_valid)
        for layer in seq2seq.decoder.layers:  # the engine's prefill: encoder K/V into the pool, once
            assert isinstance(layer, DecoderLayer) and layer.cross_attn is not None
            cross = layer.cross_attn
            k, v = cross.project_kv(memory)  # (B, h, S, d_k)
            for i, n in enumerate(src_lens):
                pool.write(cross.layer_idx, cross_slots[i, :n], k[i, :, :n].transpose(0, 1), v[i, :, :n].transpose(0, 1))

        def decode(tok: torch.Tensor, pos: torch.Tensor, cache: PagedKVCache) -> torch.Tensor:
            return seq2seq.logits(seq2seq.decode(tok, pos, cache=cache))  # memory comes from the pool only

        got = _paged_run(decode, pager, cross_slots=cross_slots, cross_mask=src_valid[:, None, None, :])
        for i, seq in enumerate(_sequences()):
            expected = seq2seq(src[i : i + 1, : src_lens[i]], torch.tensor([seq]))[0]
            diff = max_diff(got[i], expected)
            assert diff <= TOL, f"paged encoder-decoder decoding of sequence {i} differs: {diff:.3g}"


def test_paged_cache_without_cross_slots_is_refused(seq2seq: Transformer) -> None:
    pool = BlockPool(seq2seq.config, num_blocks=4, block_size=BLOCK)
    tokens, positions, cache = _Pager(pool, [[0], [1]]).step([[1], [2]])
    with torch.no_grad(), pytest.raises(RuntimeError, match="cross-attention"):
        seq2seq.decode(tokens, positions, cache=cache)


def test_block_pool_bytes_per_block(gpt: DecoderOnlyLM) -> None:
    cfg = gpt.config
    pool = BlockPool(cfg, num_blocks=3, block_size=BLOCK)
    per_block = BlockPool.bytes_per_block(cfg, BLOCK, torch.float32)
    actual = (pool.k.numel() + pool.v.numel()) * pool.k.element_size()
    assert per_block * 3 == actual, f"bytes_per_block {per_block} * 3 != allocated {actual}"
