"""The decoder-only model equals Hugging Face's GPT2LMHeadModel: import, export, logits and greedy decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model.checkpoint import export_gpt2, load_checkpoint
from model.config import preset
from model.generate import GenerationConfig, generate
from model.tokenizer import Tokenizer
from model.transformer import DecoderOnlyLM

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
VOCAB = 300
TEXTS = ["the quick brown fox jumps over the lazy dog\n", "attention is all you need; über naïve\n"] * 20


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny GPT-2 saved by transformers (safetensors) with a byte-level BPE tokenizer.json."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        initializer_range=0.2,  # peakier than 0.02, so greedy choices are not near-ties between implementations
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    folder = tmp_path_factory.mktemp("hf-gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file(), "save_pretrained did not write safetensors"
    Tokenizer.train_bpe(TEXTS, vocab_size=VOCAB).save(folder / "tokenizer.json")
    return folder


def _hf(folder: Path, attn: str | None) -> GPT2LMHeadModel:
    kwargs: dict[str, Any] = {"attn_implementation": attn} if attn is not None else {}
    return GPT2LMHeadModel.from_pretrained(folder, **kwargs).eval()


def test_import_gpt2_config_and_tokenizer(hf_folder: Path) -> None:
    ck = load_checkpoint(hf_folder)
    cfg = ck.config
    assert ck.source_format == "gpt2"
    assert isinstance(ck.model, DecoderOnlyLM)
    assert (cfg.vocab_size, cfg.d_model, cfg.h, cfg.d_ff, cfg.n_decoder_layers, cfg.max_len) == (
        VOCAB, 64, 4, 256, 2, 128,
    ), cfg
    assert (cfg.norm, cfg.positional, cfg.activation, cfg.scale_embeddings) == ("pre", "learned", "gelu_tanh", False)
    text = "the lazy fox\n"
    assert ck.tokenizer.decode(ck.tokenizer.encode(text)) == text


@pytest.mark.parametrize("attn", ["eager", None])
def test_logits_equal_hf(hf_folder: Path, attn: str | None) -> None:
    ours = load_checkpoint(hf_folder).model
    hf = _hf(hf_folder, attn)
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    diff = max_diff(got, expected)
    assert diff <= TOL, f"logits differ from GPT2LMHeadModel (attn_implementation={attn}): {diff:.3g}"
    assert expected.std() > 0.1, "near-constant logits would make the comparison meaningless"


def test_greedy_continuation_equals_hf_generate(hf_folder: Path) -> None:
    ck = load_checkpoint(hf_folder)
    hf = _hf(hf_folder, "eager")
    prompt = ck.tokenizer.encode("the quick brown fox")
    assert len(prompt) >= 2
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None, pad_token_id=0,
        )
    expected = out[0, len(prompt) :].tolist()
    for use_cache in (True, False):
        got = generate(ck.model, prompt, GenerationConfig(max_new_tokens=32, use_cache=use_cache))
        assert got == expected, f"greedy continuation differs from HF generate (use_cache={use_cache})"
    assert len(expected) == 32


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_export_gpt2_round_trip(tmp_path: Path, char_tokenizer: Tokenizer, activation: str) -> None:
    torch.manual_seed(4)
    cfg = preset("tiny-gpt", activation=activation)
    ours = DecoderOnlyLM(cfg).eval()
    with torch.no_grad():  # perturb LayerNorms and biases so a wrong mapping of them shows
        for name, p in ours.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder = export_gpt2(ours, char_tokenizer, tmp_path / "exported")
    hf = _hf(folder, "eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        expected = ours(ids)
        diff = max_diff(hf(ids).logits, expected)
        assert diff <= TOL, f"exported model in GPT2LMHeadModel differs ({activation}): {diff:.3g}"
        back = load_checkpoint(folder)
        assert back.source_format == "gpt2"
        assert torch.equal(back.model(ids), expected), "export -> import is not bit-identical"
    assert back.tokenizer.encode("Speak, speak.") == char_tokenizer.encode("Speak, speak.")


@pytest.mark.parametrize(
    "override",
    [dict(norm="post"), dict(positional="sinusoidal"), dict(scale_embeddings=True), dict(tie_embeddings=False)],
)
def test_export_refuses_models_gpt2_cannot_express(
    tmp_path: Path, char_tokenizer: Tokenizer, override: dict[str, object]
) -> None:
    model = DecoderOnlyLM(preset("tiny-gpt", **override))
    with pytest.raises(ValueError, match="GPT-2 layout"):
        export_gpt2(model, char_tokenizer, tmp_path / "refused")
