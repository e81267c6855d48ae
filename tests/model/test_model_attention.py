"""Attention: the explicit and SDPA paths agree, masks give exact zeros, captured weights are distributions,
the sinusoids are the paper's, and padding never changes real tokens' outputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model.attention import AttentionCapture, attention_weights, scaled_dot_product_attention
from model.layers import sinusoid_table
from model.masks import causal_mask, combine_masks, padding_mask
from model.transformer import DecoderOnlyLM, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _valid(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def _masks() -> dict[str, torch.Tensor | None]:
    key_valid = _valid([7, 4], 7)
    both = combine_masks(causal_mask(5, 7), padding_mask(key_valid))
    assert both is not None
    fully_masked = both.expand(2, 1, 5, 7).clone()
    fully_masked[1, 0, 2] = False  # one query that may see nothing
    return {
        "none": None,
        "causal": causal_mask(5, 7),
        "padding": padding_mask(key_valid),
        "causal+padding": both,
        "fully-masked-row": fully_masked,
    }


@pytest.mark.parametrize("name", list(_masks()))
def test_explicit_and_sdpa_paths_agree(name: str) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    mask = _masks()[name]
    explicit = attention_weights(q, k, mask) @ v
    fused = scaled_dot_product_attention(q, k, v, mask)
    assert not explicit.isnan().any() and not fused.isnan().any(), f"NaN with mask {name}"
    diff = max_diff(explicit, fused)
    assert diff <= TOL, f"explicit and SDPA attention differ with mask {name}: {diff:.3g}"


def test_mask_semantics_are_exact() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8)
    masks = _masks()
    w = attention_weights(q, k, masks["causal+padding"])
    assert (w[1, :, :, 4:] == 0).all(), "padded keys must get exactly 0 weight"
    assert (w.masked_select(~causal_mask(5, 7)) == 0).all(), "weights above the causal diagonal must be exactly 0"
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 5), atol=1e-6), "rows must sum to 1"
    w = attention_weights(q, k, masks["fully-masked-row"])
    assert (w[1, :, 2] == 0).all() and not w.isnan().any(), "a fully masked row must be zeros, not NaN"
    v = torch.randn(2, 4, 7, 8)
    out = scaled_dot_product_attention(q, k, v, masks["fully-masked-row"])
    assert (out[1, :, 2] == 0).all() and not out.isnan().any(), "SDPA: a fully masked row must give zeros"


def test_sinusoid_table_is_the_papers_formula(paper_pe: Callable[[int, int], torch.Tensor]) -> None:
    for max_len, d_model in ((50, 16), (20, 15)):
        diff = max_diff(sinusoid_table(max_len, d_model), paper_pe(max_len, d_model))
        assert diff <= 1e-6, f"sinusoid_table({max_len}, {d_model}) differs from the paper's formula: {diff:.3g}"


def test_model_uses_the_papers_sinusoids(seq2seq: Transformer, paper_pe: Callable[[int, int], torch.Tensor]) -> None:
    cfg = seq2seq.config
    table = seq2seq.positions(torch.arange(cfg.max_len)[None])[0]
    assert max_diff(table, paper_pe(cfg.max_len, cfg.d_model)) <= 1e-6


def test_capture_path_equals_sdpa_path_and_weights_are_exact(seq2seq: Transformer) -> None:
    torch.manual_seed(2)
    cfg = seq2seq.config
    src = torch.randint(0, cfg.src_vocab_size or cfg.vocab_size, (2, 7))
    tgt = torch.randint(0, cfg.vocab_size, (2, 6))
    src_valid, tgt_valid = _valid([7, 4], 7), _valid([6, 3], 6)
    capture = AttentionCapture()
    with torch.no_grad():
        fused = seq2seq(src, tgt, src_valid, tgt_valid)
        explicit = seq2seq(src, tgt, src_valid, tgt_valid, capture=capture)
    diff = max_diff(fused, explicit)
    assert diff <= TOL, f"forward with capture (explicit attention) differs from SDPA: {diff:.3g}"
    expected = {(kind, i) for kind in ("encoder_self", "decoder_self", "cross") for i in range(2)}
    assert set(capture.weights) == expected, f"captured {sorted(capture.weights)}"
    for (kind, layer), w in capture.weights.items():
        t_q, t_k = (7, 7) if kind == "encoder_self" else (6, 7) if kind == "cross" else (6, 6)
        assert w.shape == (2, cfg.h, t_q, t_k), f"{kind}[{layer}] shape {tuple(w.shape)}"
        assert torch.allclose(w.sum(-1), torch.ones(2, cfg.h, t_q), atol=1e-5), f"{kind}[{layer}] rows != 1"
        if kind == "decoder_self":
            assert (w.masked_select(~causal_mask(6, 6)) == 0).all(), f"{kind}[{layer}] sees the future"
            assert (w[1, :, :, 3:] == 0).all(), f"{kind}[{layer}] attends to target padding"
        else:
            assert (w[1, :, :, 4:] == 0).all(), f"{kind}[{layer}] attends to source padding"


def test_capture_filters_kinds_and_layers(gpt: DecoderOnlyLM) -> None:
    capture = AttentionCapture(kinds=["decoder_self"], layers=[1])
    with torch.no_grad():
        gpt(torch.randint(0, gpt.config.vocab_size, (1, 5)), capture=capture)
    assert list(capture.weights) == [("decoder_self", 1)]


def test_left_padding_rows_are_zero_and_real_tokens_unchanged(gpt: DecoderOnlyLM) -> None:
    """Left padding makes the pad queries' rows fully masked: zeros in both paths, no NaN anywhere."""
    torch.manual_seed(3)
    seq = torch.randint(0, gpt.config.vocab_size, (1, 6))
    pad = 3
    tokens = torch.cat([torch.zeros(1, pad, dtype=torch.long), seq], dim=1)
    positions = (torch.arange(pad + 6) - pad).clamp(min=0)[None]
    valid = torch.arange(pad + 6)[None] >= pad
    capture = AttentionCapture()
    with torch.no_grad():
        alone = gpt(seq)
        fused = gpt(tokens, positions, valid=valid)
        explicit = gpt(tokens, positions, valid=valid, capture=capture)
    for name, out in (("SDPA", fused), ("explicit", explicit)):
        assert not out.isnan().any(), f"{name}: NaN from fully masked rows"
        diff = max_diff(out[:, pad:], alone)
        assert diff <= TOL, f"{name}: left padding changed real tokens' logits by {diff:.3g}"
    for key, w in capture.weights.items():
        assert (w[0, :, :pad] == 0).all(), f"{key}: fully masked pad rows must be all zeros"
        assert (w[0, :, pad:, :pad] == 0).all(), f"{key}: real tokens attend to padding"


def test_more_padding_does_not_change_real_tokens_decoder_only(gpt: DecoderOnlyLM) -> None:
    torch.manual_seed(4)
    tokens = torch.randint(0, gpt.config.vocab_size, (2, 8))
    valid = _valid([8, 5], 8)
    with torch.no_grad():
        base = gpt(tokens, valid=valid)
        more = gpt(torch.cat([tokens, torch.zeros(2, 4, dtype=torch.long)], 1), valid=_valid([8, 5], 12))
    assert max_diff(more[0, :8], base[0]) <= TOL and max_diff(more[1, :5], base[1, :5]) <= TOL


def test_more_padding_does_not_change_real_tokens_encoder_decoder(seq2seq: Transformer) -> None:
    torch.manual_seed(5)
    cfg = seq2seq.config
    src = torch.randint(1, cfg.src_vocab_size or cfg.vocab_size, (2, 7))
    tgt = torch.randint(1, cfg.vocab_size, (2, 6))
    src_valid, tgt_valid = _valid([7, 4], 7), _valid([6, 3], 6)
    with torch.no_grad():
        base = seq2seq(src, tgt, src_valid, tgt_valid)
        # Five more pad tokens on both sides, with non-zero ids so the padded content is not the default.
        src2 = torch.cat([src, torch.full((2, 5), 7)], 1)
        tgt2 = torch.cat([tgt, torch.full((2, 5), 9)], 1)
        more = seq2seq(src2, tgt2, _valid([7, 4], 12), _valid([6, 3], 11))
        # Changing the content under the padding must not matter either.
        src3 = src2.clone()
        src3[1, 4:] = 2
        again = seq2seq(src3, tgt2, _valid([7, 4], 12), _valid([6, 3], 11))
    for i, n in enumerate((6, 3)):
        diff = max_diff(more[i, :n], base[i, :n])
        assert diff <= TOL, f"row {i}: more padding changed real tokens' logits by {diff:.3g}"
        assert max_diff(again[i, :n], base[i, :n]) <= TOL, f"row {i}: padded source content leaked"
