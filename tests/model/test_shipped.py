"""The two shipped checkpoints load and still do what their model cards say, on small held-out samples committed
next to the tests (tests/data: the first 100 test_2016_flickr pairs, a 20k-character slice of the Shakespeare
validation split); the thresholds sit just under the values measured when the models were shipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import sacrebleu
import torch

from model.checkpoint import load_checkpoint
from model.data import encode_chars, read_lines
from model.evaluate import lm_loss, translate
from model.transformer import DecoderOnlyLM, Transformer

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "model" / "checkpoints"
DATA = ROOT / "tests" / "data"
SHIPPED_FILES = ["MODEL_CARD.md", "config.json", "loss_curve.png", "model.safetensors", "tokenizer.json", "train_log.csv"]

# Measured at shipping time (see each MODEL_CARD.md): greedy BLEU on the 100 sentences, loss on the slice.
TRANSLATOR_MIN_BLEU_100 = 18.0  # measured 18.60
LM_MAX_LOSS_SLICE = 1.65  # measured 1.6268


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["shakespeare-gpt", "multi30k-en-de"])
def test_shipped_folder_holds_only_the_checkpoint_files_and_is_small(name: str) -> None:
    folder = CHECKPOINTS / name
    assert sorted(p.name for p in folder.iterdir()) == SHIPPED_FILES
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 25 * 2**20
    card = (folder / "MODEL_CARD.md").read_text()
    assert "make train-" in card and "/work/" not in card  # the command, with placeholder data paths


def test_translator_loads_with_the_papers_architecture_and_translates() -> None:
    ckpt = load_checkpoint(CHECKPOINTS / "multi30k-en-de")
    model, tok = ckpt.model, ckpt.tokenizer
    assert isinstance(model, Transformer)
    cfg = model.config
    assert (cfg.norm, cfg.positional, cfg.activation) == ("post", "sinusoidal", "relu")
    assert cfg.share_embeddings and cfg.tie_embeddings and cfg.scale_embeddings and cfg.max_len >= 128
    sources = read_lines(DATA / "multi30k_test100.en")
    references = read_lines(DATA / "multi30k_test100.de")
    assert len(sources) == len(references) == 100
    with torch.inference_mode():
        outputs = translate(model, tok, sources)
    score = sacrebleu.corpus_bleu(outputs, [references]).score
    assert score > TRANSLATOR_MIN_BLEU_100, (score, outputs[:3])


def test_language_model_loads_and_predicts_held_out_shakespeare() -> None:
    ckpt = load_checkpoint(CHECKPOINTS / "shakespeare-gpt")
    model, tok = ckpt.model, ckpt.tokenizer
    assert isinstance(model, DecoderOnlyLM)
    assert (model.config.norm, model.config.positional) == ("pre", "learned")
    text = (DATA / "shakespeare_val_slice.txt").read_text(encoding="utf-8")
    assert len(text) > 15_000
    ids = encode_chars(tok, text)
    assert (ids != tok.unk_id).all()
    with torch.inference_mode():
        loss, n = lm_loss(model, ids)
    assert n > 15_000
    assert loss < LM_MAX_LOSS_SLICE, loss
