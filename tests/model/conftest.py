"""Shared fixtures for the model package tests: tiny random-weight models (nothing is downloaded)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from model.config import TransformerConfig, preset
from model.tokenizer import Tokenizer
from model.transformer import DecoderOnlyLM, Transformer, build_model

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\tÉtienne naïve café — déjà vu; Grüße aus Köln!\n"
)


def seq2seq_config(**overrides: Any) -> TransformerConfig:
    """2 + 2 post-norm layers, d_model 32, 4 heads, sinusoidal positions, ReLU, no dropout."""
    return preset("tiny-seq2seq", **overrides)


def gpt_config(**overrides: Any) -> TransformerConfig:
    """2 pre-norm layers, d_model 32, 4 heads, learned positions, GELU, no dropout."""
    return preset("tiny-gpt", **overrides)


def make_model(cfg: TransformerConfig, seed: int = 0) -> Transformer | DecoderOnlyLM:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.fixture
def seq2seq() -> Transformer:
    model = make_model(seq2seq_config(src_vocab_size=50))
    assert isinstance(model, Transformer)
    return model


@pytest.fixture
def gpt() -> DecoderOnlyLM:
    model = make_model(gpt_config())
    assert isinstance(model, DecoderOnlyLM)
    return model


@pytest.fixture
def char_tokenizer() -> Tokenizer:
    return Tokenizer.train_char(CORPUS)


@pytest.fixture
def make() -> Callable[..., Transformer | DecoderOnlyLM]:
    """make(arch, seed=0, **overrides): a tiny model of either architecture."""

    def _make(arch: str, seed: int = 0, **overrides: Any) -> Transformer | DecoderOnlyLM:
        cfg = seq2seq_config(**overrides) if arch == "encoder-decoder" else gpt_config(**overrides)
        return make_model(cfg, seed)

    return _make


@pytest.fixture
def paper_pe() -> Callable[[int, int], torch.Tensor]:
    """The sinusoids of section 3.5 written out element by element (float64), independent of model.layers."""

    def _pe(max_len: int, d_model: int) -> torch.Tensor:
        table = torch.empty(max_len, d_model, dtype=torch.float64)
        for pos in range(max_len):
            for j in range(d_model):
                i = j // 2
                angle = pos / 10000 ** (2 * i / d_model)
                table[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
        return table

    return _pe


