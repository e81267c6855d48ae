"""Tokenizers: round trips (non-ASCII, newlines), special-token ids, save/load, character offsets."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizer import BOS, EOS, PAD, UNK, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [
    "To be, or not to be, that is the question:\n",
    "Whether 'tis nobler in the mind to suffer\n\tThe slings and arrows of outrageous fortune,\n",
    "Grüße aus Köln — naïve café, déjà vu. 東京は晴れ。🙂\n",
] * 10


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.train_char("".join(CORPUS))


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, vocab_size=400)


def _check_specials(tok: Tokenizer) -> None:
    maybe = [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id]
    ids = [i for i in maybe if i is not None]
    assert len(set(ids)) == 4, f"special ids {maybe}: each special needs its own id"
    for name, i in zip((PAD, BOS, EOS, UNK), ids, strict=True):
        assert tok.tok.id_to_token(i) == name, f"{name} has id {i} but that id is {tok.tok.id_to_token(i)!r}"
        assert tok.token_text(i) == name
    assert tok.special_ids == set(ids)


def _check_offsets(tok: Tokenizer, text: str) -> None:
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert len(offsets) == len(ids)
    starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
    assert starts == sorted(starts) and ends == sorted(ends), f"offsets go backwards: {offsets}"
    covered = ""
    last_end = 0
    for i, (start, end) in zip(ids, offsets, strict=True):
        assert 0 <= start <= last_end and start <= end <= len(text), f"bad or gapped span {(start, end)}"
        piece = tok.token_text(i)
        # A token of whole characters spans exactly its text; a byte-level piece of a multi-byte character
        # (decoded as U+FFFD) spans the characters it touches.
        if "\ufffd" not in piece:
            assert text[start:end] == piece, f"token {i} {piece!r} has offsets {(start, end)} -> {text[start:end]!r}"
        if end > last_end:
            covered += text[max(start, last_end) : end]
            last_end = end
    assert covered == text, "offsets do not cover the text in order"


TEXTS = [
    "To be, or not to be",
    "line one\nline two\n\n\ttabbed",
    "Grüße — naïve café. 東京。🙂",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_char_round_trip(char_tok: Tokenizer, text: str) -> None:
    ids = char_tok.encode(text)
    assert len(ids) == len(text), "a character tokenizer gives one id per character"
    assert char_tok.decode(ids) == text


def test_char_specials_and_unknown(char_tok: Tokenizer) -> None:
    _check_specials(char_tok)
    assert char_tok.vocab_size == 4 + len(set("".join(CORPUS)))
    ids = char_tok.encode("to be", add_bos=True, add_eos=True)
    assert ids[0] == char_tok.bos_id and ids[-1] == char_tok.eos_id
    assert char_tok.decode(ids) == "to be", "decode must drop specials by default"
    assert char_tok.decode(ids, skip_special=False) == f"{BOS}to be{EOS}"
    assert char_tok.encode("Z") == [char_tok.unk_id], "a character never seen must map to <unk>"
    chars = sorted(set("".join(CORPUS)))
    assert [char_tok.encode(c)[0] for c in chars] == list(range(4, 4 + len(chars))), "ids not in sorted order"


@pytest.mark.parametrize("text", [*TEXTS, "unseen: Ωmega ß ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \r\n end"])
def test_bpe_round_trip(bpe_tok: Tokenizer, text: str) -> None:
    ids = bpe_tok.encode(text)
    assert bpe_tok.unk_id not in ids, "byte-level BPE never needs <unk>"
    assert bpe_tok.decode(ids) == text


def test_bpe_merges_and_specials(bpe_tok: Tokenizer) -> None:
    _check_specials(bpe_tok)
    text = "To be, or not to be, that is the question:\n"
    assert len(bpe_tok.encode(text)) < len(text.encode()) / 2, "BPE learned (almost) no merges"
    assert 256 + 4 < bpe_tok.vocab_size <= 400
    ids = bpe_tok.encode(text, add_bos=True, add_eos=True)
    assert (ids[0], ids[-1]) == (bpe_tok.bos_id, bpe_tok.eos_id)
    assert bpe_tok.decode(ids) == text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_gives_same_ids(tmp_path: Path, char_tok: Tokenizer, bpe_tok: Tokenizer, kind: str) -> None:
    tok = char_tok if kind == "char" else bpe_tok
    tok.save(tmp_path / "tokenizer.json")
    back = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert back.vocab_size == tok.vocab_size
    assert (back.pad_id, back.bos_id, back.eos_id, back.unk_id) == (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text), f"{kind}: ids changed after save/load for {text!r}"
        assert back.encode_with_offsets(text) == tok.encode_with_offsets(text)


@pytest.mark.parametrize("text", TEXTS[:3])
def test_char_offsets(char_tok: Tokenizer, text: str) -> None:
    _, offsets = char_tok.encode_with_offsets(text)
    assert offsets == [(i, i + 1) for i in range(len(text))], "char offsets must be character (not byte) indices"
    _check_offsets(char_tok, text)


@pytest.mark.parametrize("text", TEXTS[:3])
def test_bpe_offsets(bpe_tok: Tokenizer, text: str) -> None:
    _check_offsets(bpe_tok, text)
