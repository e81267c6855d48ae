"""The fused CPU step (model/fused_step.py, csrc/decoder_step.cpp) against the model's own eager modules on one
step: decode rows and a prefill chunk over random block tables with shared blocks, Llama shapes (GQA with the
kernel's head sizes and another) and GPT-2's, bfloat16, int8 and float32 weights. In bfloat16 hidden states and the
K/V written to the pool agree to the bit but where an activation's polynomial or LayerNorm's sums land a value on
the other side of a rounding (and, with int8 products that keep x in bfloat16, what such a flip carries into); in
float32 to ~1e-6; and which models and steps it takes. Runs on either build of the kernels, AVX-512 BF16 or AVX2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model import cpu_kernels, fused_step
from model.config import TransformerConfig, preset
from model.cpu_linear import PackedInt8Linear
from model.cpu_linear import kernel as matvec_kernel
from model.paged_cache import BlockPool, PagedKVCache, StepLayout
from model.transformer import build_model
from service.engine.weights import prepare

pytestmark = pytest.mark.skipif(fused_step.kernel() is None,
                                reason=f"no fused step: {cpu_kernels.why_not('decoder_step') or 'no AVX-512 BF16 or AVX2'}")

BS = 16


def config(kind: str, d_k: int, h: int, h_kv: int, layers: int = 3) -> TransformerConfig:
    """A Llama shape (RMSNorm, rotary, gated silu, GQA) or GPT-2's (LayerNorm, learned positions, biases) with
    `kind` its activation (gelu_tanh as GPT-2's, gelu as the shipped Shakespeare model's)."""
    size = dict(vocab_size=96, d_model=d_k * h, h=h, d_ff=3 * d_k * h, n_decoder_layers=layers, max_len=256)
    if kind == "llama":
        return preset("tiny-llama", n_kv_heads=h_kv, **size)
    return preset("tiny-gpt", activation=kind, **size)


def layout(lens: list[int], chunk: int, blocks: int, null: int, gen: torch.Generator) -> tuple[StepLayout, torch.Tensor]:
    """Decode rows for sequences of `lens` keys (each table a random permutation of blocks; the first two share
    their first block), then one prefill chunk of `chunk` tokens at the start of a last sequence; positions."""
    tables, rows, ctx, slots, positions = [], [], [], [], []
    perm = torch.randperm(blocks, generator=gen).tolist()
    for i, n in enumerate([*lens, chunk]):
        width = -(-n // BS)
        table = [perm.pop() for _ in range(width)]
        if i == 1:
            table[0] = tables[0][0]  # a shared prefix block, read in place by both rows
        tables.append(table)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [null] * (width - len(t)) for t in tables])
    for i, n in enumerate(lens):  # decode: the row is the sequence's last key
        rows.append(i), ctx.append(n), positions.append(n - 1)
        slots.append(tables[i][(n - 1) // BS] * BS + (n - 1) % BS)
    for p in range(chunk):  # the chunk: causal among its rows
        rows.append(len(lens)), ctx.append(p + 1), positions.append(p)
        slots.append(tables[-1][p // BS] * BS + p % BS)
    lay = StepLayout(torch.tensor(slots), padded, torch.tensor(rows), torch.tensor(ctx), num_decode=len(lens),
                     decode_len=max(lens))
    return lay, torch.tensor(positions)


@pytest.mark.parametrize("kind,d_k,h,h_kv", [("llama", 64, 4, 2), ("llama", 64, 9, 3), ("llama", 8, 4, 2),
                                             ("gelu_tanh", 64, 4, 4), ("gelu", 32, 4, 4)])
@pytest.mark.parametrize("dtype,quantization,kv", [
    (torch.bfloat16, "none", None), (torch.bfloat16, "int8", None), (torch.float32, "none", None),
    (torch.float32, "int8", None), (torch.float32, "int8", torch.bfloat16)],
    ids=["bf16", "bf16-int8", "f32", "f32-int8", "f32-int8-kv-bf16"])  # kv: the pool's dtype (a bfloat16 cache)
@pytest.mark.parametrize("chunk", [11, 90], ids=["chunk11", "chunk90"])  # 90: a step of more rows than MAX_ROWS
def test_fused_step_equals_the_eager_step(kind: str, d_k: int, h: int, h_kv: int, dtype: torch.dtype,
                                          quantization: str, kv: torch.dtype | None, chunk: int) -> None:
    torch.manual_seed(0)
    model = build_model(config(kind, d_k, h, h_kv)).eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.RMSNorm | nn.LayerNorm)):
        nn.init.uniform_(norm.weight, 0.5, 1.5)  # not the ones they start as
        if getattr(norm, "bias", None) is not None:
            nn.init.uniform_(norm.bias, -0.5, 0.5)
    model.to(dtype)
    prepare(model, quantization)
    fused = fused_step.FusedStep(model)
    if chunk > 64 and not fused.any_rows:
        pytest.skip("this build's float32 product keeps MAX_ROWS: the step takes no prefill of 90 rows")
    cfg, gen = model.config, torch.Generator().manual_seed(1)
    pool = BlockPool(cfg, 64, BS, dtype=kv or dtype, kernel=cpu_kernels.load("paged_attention"))
    pool.k.normal_(generator=gen), pool.v.normal_(generator=gen)  # earlier tokens' keys and values
    lay, positions = layout([37, 20, 5, 1], chunk, 64, pool.null_block, gen)
    tokens = torch.randint(0, cfg.vocab_size, positions.shape, generator=gen)
    assert fused.accepts(lay, len(tokens))
    before = pool.k.clone(), pool.v.clone()
    with torch.inference_mode():
        want = model.decode(tokens[None], positions[None], cache=PagedKVCache(pool, lay))[0]
        written = pool.k.clone(), pool.v.clone()
        pool.k.copy_(before[0]), pool.v.copy_(before[1])
        got = fused(tokens, positions, PagedKVCache(pool, lay))
        rows = torch.tensor([0, 2, len(tokens) - 1])  # two decode rows and the chunk's last
        pool.k.copy_(before[0]), pool.v.copy_(before[1])
        logits = fused.logits(tokens, positions, PagedKVCache(pool, lay), rows)
        head = model.logits(got.index_select(0, rows)).float()  # the eager head over the fused stack's rows
    assert fused.has_head and logits.dtype == torch.float32 and logits.shape == (3, cfg.vocab_size)
    tol = 1e-4 if dtype == torch.float32 and quantization == "none" else 2e-2
    torch.testing.assert_close(logits, head, rtol=tol, atol=tol)
    # A rare last-bit flip (LayerNorm's sums in another order, an activation's polynomial) carries on through x
    # in bfloat16: into its row's next products, and through that row's K/V into the chunk's later rows. The int8 x
    # int8 product (x quantized in blocks) absorbs it; int8 widened (x in bfloat16, as for bfloat16 weights, where
    # K is not a multiple of 32) does not: one LayerNorm flip in a GELU model's second layer left ~72% bit-equal.
    # A chunk of 90 rows carries a flip through up to 89 later rows (and x's int8 quantization can round it on):
    # there the looser bounds, and test_a_long_fused_step_equals_it_in_chunks holds the fused step to the bit.
    carries = chunk > 64 or (quantization == "int8" and not any(getattr(m, "q8", True) for m in model.modules()
                                                               if isinstance(m, PackedInt8Linear)))
    tol = 6e-2 if chunk > 64 and tol > 1e-4 else tol
    if dtype == torch.bfloat16:  # the same roundings: equal but for a rare last bit
        same = got == want
        assert same.float().mean() > (0.5 if carries else 0.99), f"{int((~same).sum())} of {same.numel()} differ"
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        for mine, theirs in zip((pool.k, pool.v), written, strict=True):
            if carries:
                torch.testing.assert_close(mine.float(), theirs.float(), rtol=tol, atol=tol)
            else:
                assert torch.equal(mine, theirs), "the K/V written to the pool differ"
    else:  # float32: RMSNorm's and the activations' sums and polynomials differ from torch's in the last bits (and
        # with int8 products, x's block quantization can round such a difference to the next step of its scale)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for mine, theirs in zip((pool.k, pool.v), written, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,quantization", [(torch.bfloat16, "none"), (torch.float32, "int8")])
def test_a_long_fused_step_equals_it_in_chunks(dtype: torch.dtype, quantization: str) -> None:
    """A prefill of 90 rows in one fused step and in two of 45 (the second over the first's K/V): the same hidden
    states and K/V to the bit, each row's products and attention being independent of the rows beside it."""
    torch.manual_seed(0)
    model = build_model(config("llama", 64, 9, 3)).eval().to(dtype)
    prepare(model, quantization)
    fused, gen = fused_step.FusedStep(model), torch.Generator().manual_seed(1)
    if not fused.any_rows:
        pytest.skip("this build's float32 product keeps MAX_ROWS")
    pool = BlockPool(model.config, 64, BS, dtype=dtype, kernel=cpu_kernels.load("paged_attention"))
    lay, positions = layout([37, 20], 90, 64, pool.null_block, gen)
    tokens = torch.randint(0, model.config.vocab_size, positions.shape, generator=gen)
    with torch.inference_mode():
        whole = fused(tokens, positions, PagedKVCache(pool, lay))
        written = pool.k.clone(), pool.v.clone()
        pool.k.zero_(), pool.v.zero_()
        parts = []
        for rows in (torch.arange(0, 47), torch.arange(47, 92)):  # the two decode rows and 45 of the chunk, then 45
            part = StepLayout(lay.write_slots[rows], lay.tables, lay.row_table[rows], lay.context_lens[rows],
                              num_decode=lay.num_decode if rows[0] == 0 else 0, decode_len=lay.decode_len)
            parts.append(fused(tokens[rows], positions[rows], PagedKVCache(pool, part)))
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(pool.k, written[0]) and torch.equal(pool.v, written[1])


def test_what_the_fused_step_takes() -> None:
    torch.manual_seed(0)
    llama_model = build_model(config("llama", 64, 4, 2)).eval()
    assert "packed" in fused_step.why_not(llama_model)  # not prepared
    served = copy.deepcopy(llama_model).to(torch.bfloat16)
    prepare(served)
    assert fused_step.why_not(served) == ""
    translator = build_model(preset("tiny-seq2seq")).eval().to(torch.bfloat16)
    prepare(translator)
    assert "decoder-only" in fused_step.why_not(translator)
    post_norm = build_model(preset("tiny-gpt", norm="post")).eval().to(torch.bfloat16)
    prepare(post_norm)
    assert "pre-norm" in fused_step.why_not(post_norm)
    fused, gen = fused_step.FusedStep(served), torch.Generator().manual_seed(0)
    lay, _ = layout([3], 40, 16, 16, gen)
    assert fused.accepts(lay, 41)
    assert fused.any_rows  # bfloat16 products: as fast on the kernel at a prefill's rows (cpu_linear.takes_any_rows)
    assert fused.accepts(lay, 600)
    float32 = copy.deepcopy(llama_model)
    prepare(float32)
    f32 = fused_step.FusedStep(float32)
    assert f32.any_rows == (matvec_kernel() is not None and matvec_kernel().isa() == "avx512bf16")
    assert f32.accepts(lay, 64) and f32.accepts(lay, 65) == f32.any_rows  # AVX2's float32: MAX_ROWS at most
    assert not fused.accepts(StepLayout(lay.write_slots, lay.tables, lay.row_table, lay.context_lens,
                                        capture=frozenset({0})), 41)  # recorded attention: the explicit path


@pytest.mark.parametrize("kind,dtype", [("llama", torch.bfloat16), ("llama", torch.float32),
                                        ("gelu_tanh", torch.bfloat16), ("gelu", torch.float32)])
def test_the_bound_inputs_equal_the_models_embedding_and_angles(kind: str, dtype: torch.dtype) -> None:
    model = build_model(config(kind, 32, 4, 2 if kind == "llama" else 4)).eval().to(dtype)
    prepare(model)
    fused = fused_step.FusedStep(model)
    assert fused.has_inputs
    positions = torch.tensor([0, 1, 17, 100, model.config.max_len - 1])  # the last one the tables hold
    tokens = torch.randint(0, model.config.vocab_size, positions.shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        x, cos, sin = fused.step.inputs(tokens, positions)
        assert torch.equal(x, model.embed(tokens[None], positions[None], model.tgt_embed)[0])
        rotary = model.rotations(positions[None], dtype)
        if rotary is None:
            assert cos.numel() == sin.numel() == 0
        else:
            assert torch.equal(cos, rotary[0].reshape(len(tokens), -1)) and torch.equal(sin, rotary[1].reshape(len(tokens), -1))
        with pytest.raises(RuntimeError, match="out of range"):
            fused.step.inputs(tokens, positions + 1)  # past the last position
