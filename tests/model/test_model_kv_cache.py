"""Cached incremental decoding equals the full forward, for both caches and both architectures."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from model import cpu_kernels
from model.config import preset
from model.kv_cache import ContiguousKVCache
from model.layers import DecoderLayer
from model.masks import length_mask
from model.paged_cache import BlockPool, PagedKVCache, PrefillChunk, StepLayout
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
def test_contiguous_cache_decoder_only(lm: DecoderOnlyLM, chunks: list[int]) -> None:
    gpt = lm
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

# Each step feeds some sequences a chunk of tokens: 1 token goes through the decode rows, more through a prefill
# chunk. Each sequence's blocks are scattered over the pool (its block table); block 12 belongs to nobody.
TABLES = [[7, 2, 9, 4], [0, 5, 11, 3], [8, 1, 10, 6]]
NUM_BLOCKS = 13
SLOTS = [0, 2, 3]  # a translator's encoder K/V rows
SCHEDULE = [{0: 5, 1: 3}, {0: 1, 1: 4, 2: 6}, {0: 1, 1: 1, 2: 1}, {0: 2, 1: 1, 2: 1}, {0: 1, 2: 3}]


@pytest.fixture(params=["kernel", "plain"])
def kernel(request: pytest.FixtureRequest) -> ModuleType | None:
    """The CPU paged-attention kernel, or none (the plain torch path)."""
    if request.param == "plain":
        return None
    module = cpu_kernels.load("paged_attention")
    if module is None:
        pytest.skip(f"no paged-attention kernel here: {cpu_kernels.why_not('paged_attention')}")
    return module


def _step(pool: BlockPool, fed: list[int], chunk: dict[int, int], seqs: list[list[int]],
          src_lens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, PagedKVCache, dict[int, list[int]]]:
    """Tokens (1, N), positions (1, N) and the step's cache; which rows hold each sequence's new tokens."""
    decodes = [i for i, n in chunk.items() if n == 1]
    prefills = [(i, n) for i, n in chunk.items() if n > 1]
    tables = [TABLES[i] for i in decodes] + [TABLES[i] for i, _ in prefills]
    tokens, positions, slots, row_table, lens = [], [], [], [], []  # type: list[int], list[int], list[int], list[int], list[int]
    rows: dict[int, list[int]] = {}
    chunks = []
    for t, (i, n) in enumerate([(i, 1) for i in decodes] + prefills):
        p = fed[i]
        rows[i] = list(range(len(tokens), len(tokens) + n))
        if n > 1:
            chunks.append(PrefillChunk(len(tokens), n, t, p, src_lens[i] if src_lens else 0, SLOTS[i]))
        tokens += seqs[i][p : p + n]
        positions += list(range(p, p + n))
        slots += [pool.slot(TABLES[i][q // BLOCK], q % BLOCK) for q in range(p, p + n)]
        row_table += [t] * n
        lens += list(range(p + 1, p + n + 1))
    longest = max(lens[: len(decodes)], default=1)
    layout = StepLayout(torch.tensor(slots), torch.tensor(tables), torch.tensor(row_table), torch.tensor(lens),
                        len(decodes), longest, chunks)
    if src_lens and decodes:
        cross = [src_lens[i] for i in decodes]
        layout.cross_len, layout.cross_slots = max(cross), torch.tensor([SLOTS[i] for i in decodes])
        layout.cross_mask = length_mask(torch.tensor(cross), max(cross))
    for i, n in chunk.items():
        fed[i] += n
    return torch.tensor([tokens]), torch.tensor([positions]), PagedKVCache(pool, layout), rows


def _paged_run(decode: Callable[[torch.Tensor, torch.Tensor, PagedKVCache], torch.Tensor], pool: BlockPool,
               seqs: list[list[int]], src_lens: list[int] | None = None) -> list[torch.Tensor]:
    fed, per_seq = [0] * len(seqs), [[] for _ in seqs]  # type: list[int], list[list[torch.Tensor]]
    for chunk in SCHEDULE:
        tokens, positions, cache, rows = _step(pool, fed, chunk, seqs, src_lens)
        out = decode(tokens, positions, cache)[0]  # (N, vocab)
        for i, r in rows.items():
            per_seq[i].append(out[r])
    return [torch.cat(p) for p in per_seq]


def _sequences(vocab: int) -> list[list[int]]:
    torch.manual_seed(4)
    lengths = [sum(c.get(i, 0) for c in SCHEDULE) for i in range(len(TABLES))]
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]


@pytest.fixture(params=["tiny-gpt", "tiny-llama", "multi-query"])
def lm(request: pytest.FixtureRequest) -> DecoderOnlyLM:
    """The GPT-2 shape, the Llama shape (rotary, RMSNorm, SwiGLU, 4 query heads over 2 K/V heads) and MQA."""
    cfg = preset("tiny-gpt") if request.param == "tiny-gpt" else preset(
        "tiny-llama", n_kv_heads=2 if request.param == "tiny-llama" else 1)
    torch.manual_seed(0)
    return DecoderOnlyLM(cfg).eval()


def test_paged_cache_decoder_only(lm: DecoderOnlyLM, kernel: ModuleType | None) -> None:
    gpt = lm
    pool = BlockPool(gpt.config, NUM_BLOCKS, BLOCK, kernel=kernel)
    seqs = _sequences(gpt.config.vocab_size)
    with torch.no_grad():
        got = _paged_run(lambda tok, pos, cache: gpt(tok, pos, cache=cache), pool, seqs)
        for i, seq in enumerate(seqs):
            expected = gpt(torch.tensor([seq]))[0]
            diff = max_diff(got[i], expected)
            assert diff <= TOL, f"paged decoding of sequence {i} differs from its full forward: {diff:.3g}"
    assert pool.k[:, 12].abs().sum() == 0, "the cache wrote into a block nobody holds"


def test_paged_cache_encoder_decoder(seq2seq: Transformer, kernel: ModuleType | None) -> None:
    torch.manual_seed(3)
    cfg = seq2seq.config
    src_lens = [6, 3, 5]
    src = torch.randint(0, cfg.src_vocab_size or cfg.vocab_size, (3, max(src_lens)))
    src_valid = torch.arange(src.size(1))[None, :] < torch.tensor(src_lens)[:, None]
    pool = BlockPool(cfg, NUM_BLOCKS, BLOCK, num_slots=4, kernel=kernel)
    seqs = _sequences(cfg.vocab_size)
    with torch.no_grad():
        memory = seq2seq.encode(src, src_valid)
        for layer in seq2seq.decoder.layers:  # the engine's prefill: encoder K/V into the pool, once
            assert isinstance(layer, DecoderLayer) and layer.cross_attn is not None
            k, v = layer.cross_attn.project_kv(memory)  # (B, h, S, d_k)
            for i, n in enumerate(src_lens):
                pool.write_cross(layer.cross_attn.layer_idx, SLOTS[i], k[i, :, :n].transpose(0, 1),
                                 v[i, :, :n].transpose(0, 1))

        def decode(tok: torch.Tensor, pos: torch.Tensor, cache: PagedKVCache) -> torch.Tensor:
            return seq2seq.logits(seq2seq.decode(tok, pos, cache=cache))  # memory comes from the pool only

        got = _paged_run(decode, pool, seqs, src_lens)
        for i, seq in enumerate(seqs):
            expected = seq2seq(src[i : i + 1, : src_lens[i]], torch.tensor([seq]))[0]
            diff = max_diff(got[i], expected)
            assert diff <= TOL, f"paged encoder-decoder decoding of sequence {i} differs: {diff:.3g}"


def test_paged_cache_without_cross_pool_is_refused(gpt: DecoderOnlyLM, seq2seq: Transformer) -> None:
    pool = BlockPool(gpt.config, 2, BLOCK)  # a decoder-only pool
    one = torch.tensor([1])
    cache = PagedKVCache(pool, StepLayout(torch.tensor([0]), torch.tensor([[0]]), torch.tensor([0]), one, 1, 1))
    with torch.no_grad(), pytest.raises(RuntimeError, match="cross-attention"):
        seq2seq.decode(torch.tensor([[1]]), torch.tensor([[0]]), cache=cache)


def test_block_pool_holds_what_its_blocks_need(lm: DecoderOnlyLM) -> None:
    cfg = lm.config
    pool = BlockPool(cfg, 6, BLOCK)
    per_block = BlockPool.bytes_per_block(cfg, BLOCK, torch.float32)
    actual = (pool.k.numel() + pool.v.numel()) * pool.k.element_size()
    assert per_block * (6 + 1) == actual  # + the null block
    assert pool.slot(2, 3) == 2 * BLOCK + 3 and pool.null_block == 6
