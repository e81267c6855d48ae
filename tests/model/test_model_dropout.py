"""Dropout (P_drop on embeddings, sub-layers, FFN; attention dropout) acts in train mode only."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model.attention import AttentionCapture
from model.config import preset
from model.layers import FeedForward, Residual
from model.transformer import DecoderOnlyLM, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

Make = Callable[..., Transformer | DecoderOnlyLM]


def _run(model: Transformer | DecoderOnlyLM, capture: bool) -> torch.Tensor:
    """Logits for fixed tokens (drawn from their own generator, so dropout's global RNG state is untouched)."""
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    cap = AttentionCapture() if capture else None  # capture forces the explicit (non-SDPA) attention path
    with torch.no_grad():
        if isinstance(model, Transformer):
            return model(tokens, tokens.flip(1), capture=cap)
        return model(tokens, capture=cap)


@pytest.mark.parametrize("arch", ["decoder-only", "encoder-decoder"])
@pytest.mark.parametrize(
    "rates", [dict(dropout=0.3, attn_dropout=0.0), dict(dropout=0.0, attn_dropout=0.3)], ids=["p_drop", "attn"]
)
@pytest.mark.parametrize("capture", [False, True], ids=["sdpa", "explicit"])
def test_dropout_only_in_train_mode(make: Make, arch: str, rates: dict[str, float], capture: bool) -> None:
    model = make(arch, seed=3, **rates)
    plain = make(arch, seed=3)  # same weights, no dropout at all
    plain.load_state_dict(model.state_dict())
    expected = _run(plain, capture)

    model.train()
    torch.manual_seed(1)
    a, b = _run(model, capture), _run(model, capture)
    assert not torch.equal(a, b), f"{arch} {rates}: two train-mode forwards are identical (dropout inactive)"
    assert not torch.allclose(a, expected, atol=1e-4), f"{arch} {rates}: train mode equals the no-dropout model"

    model.eval()
    first, second = _run(model, capture), _run(model, capture)
    assert torch.equal(first, second), f"{arch} {rates}: eval mode is not deterministic"
    assert torch.equal(first, expected), f"{arch} {rates}: eval mode differs from the same model without dropout"



@pytest.mark.parametrize("norm", ["pre", "post"])
def test_each_dropout_site_acts_in_train_mode_only(norm: str) -> None:
    """Residual (sub-layer output), FFN activation and embeddings + PE each drop on their own."""
    cfg = preset("tiny-seq2seq", norm=norm, dropout=0.5, attn_dropout=0.0)
    torch.manual_seed(0)
    x = torch.randn(2, 5, cfg.d_model)
    residual, ffn, model = Residual(cfg), FeedForward(cfg), Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5))
    positions = torch.arange(5).expand(2, 5)
    sites: dict[str, Callable[[], torch.Tensor]] = {
        "residual": lambda: residual(x, lambda y: 2 * y),
        "ffn": lambda: ffn(x),
        "embed": lambda: model.embed(tokens, positions, model.tgt_embed),
    }
    residual_expected = x + 2 * residual.norm(x) if norm == "pre" else residual.norm(3 * x)
    expected = {
        "residual": residual_expected,
        "ffn": ffn.w_2(ffn.act(ffn.w_1(x))),
        "embed": model.tgt_embed(tokens) + model.positions(positions),
    }
    with torch.no_grad():
        for name, run in sites.items():
            for module in (residual, ffn, model):
                module.train()
            a, b = run(), run()
            assert not torch.equal(a, b), f"{name} ({norm}-norm): no dropout in train mode"
            for module in (residual, ffn, model):
                module.eval()
            diff = (run() - expected[name]).abs().max().item()
            assert diff <= 1e-6, f"{name} ({norm}-norm): eval output is not the dropout-free formula ({diff:.3g})"
