"""Incremental detokenization: deltas add up to the full decode, never cut a UTF-8 character, never show a stop."""

from __future__ import annotations

import pytest

from model.tokenizer import Tokenizer
from service.engine.detokenizer import IncrementalDetokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz ENDXSTOP.,!\n"
MULTIBYTE = "héllo 世界 🎉 naïve café — ünïcödé ✓"


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.train_char(CHARS)


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    # learned on ASCII only: every multi-byte character is split over several byte-level tokens
    return Tokenizer.train_bpe(["hello world, the quick brown fox jumps over the lazy dog. " * 20], vocab_size=300)


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Add tokens one by one until a stop string; the final flush is the last delta."""
    deltas = []
    for i in ids:
        deltas.append(detok.add(i))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas


def test_char_deltas_add_up_to_the_text(char_tok: Tokenizer) -> None:
    text = "hello world, this is fine!"
    deltas = feed(IncrementalDetokenizer(char_tok.decode), char_tok.encode(text))
    assert "".join(deltas) == text
    assert deltas[:5] == ["h", "e", "l", "l", "o"]  # without stop strings, nothing is held back


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("abc END xyz", ["END"], "abc "),
        ("abcEND", ["END"], "abc"),
        ("ENDabc", ["END"], ""),
        ("ab EN d ENE END", ["END"], "ab EN d ENE "),  # partial matches are released once they fail
        ("one. two! three", ["!", "."], "one"),  # the earliest stop wins
        ("aaSTOPbbEND", ["END", "STOP"], "aa"),
        ("no stop here", ["END"], "no stop here"),
        ("ends with EN", ["END"], "ends with EN"),  # a held prefix is released at the end
        ("x\n\ny", ["\n\n"], "x"),
    ],
)
def test_stop_strings_are_never_emitted(char_tok: Tokenizer, text: str, stop: list[str], expected: str) -> None:
    detok = IncrementalDetokenizer(char_tok.decode, stop)
    deltas = feed(detok, char_tok.encode(text))
    assert "".join(deltas) == expected
    assert detok.stopped == (expected != text)
    for s in stop:  # not even as a piece of one delta: deltas are only ever released, never taken back
        assert all(s not in d for d in deltas)


def test_a_stop_split_over_tokens_is_held_until_it_resolves(char_tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(char_tok.decode, ["STOP"])
    ids = char_tok.encode("xSTxSTOP")
    got = [detok.add(i) for i in ids[:4]]
    assert got == ["x", "", "", "STx"]  # "S", "ST" might begin STOP; "STx" cannot
    assert [detok.add(i) for i in ids[4:]] == ["", "", "", ""] and detok.stopped
    assert detok.flush() == ""


def test_stop_with_multibyte_characters_over_byte_tokens(bpe_tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(bpe_tok.decode, ["世界"])
    deltas = feed(detok, bpe_tok.encode(MULTIBYTE))
    assert "".join(deltas) == "héllo " and detok.stopped


def test_byte_level_tokens_really_split_characters(bpe_tok: Tokenizer) -> None:
    """The premise of the next test: some tokens alone decode to a broken character."""
    ids = bpe_tok.encode(MULTIBYTE)
    assert bpe_tok.decode(ids) == MULTIBYTE
    assert any("\ufffd" in bpe_tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", [MULTIBYTE, "🎉🎉🎉", "a世b界c", "héllo 世界 🎉"])
def test_incremental_decode_never_emits_a_broken_character(bpe_tok: Tokenizer, text: str) -> None:
    ids = bpe_tok.encode(text)
    deltas = feed(IncrementalDetokenizer(bpe_tok.decode), ids)
    assert "".join(deltas) == bpe_tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens had to wait for the rest of their character


def test_special_tokens_add_no_text(char_tok: Tokenizer) -> None:
    ids = [*char_tok.encode("ab"), char_tok.bos_id, char_tok.pad_id, *char_tok.encode("c")]
    assert "".join(feed(IncrementalDetokenizer(char_tok.decode), ids)) == "abc"  # type: ignore[arg-type]
