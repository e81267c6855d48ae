"""The tokenizer rebuilt from a GGUF file's metadata, against transformers' GGUF loader (a reader we did not write)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from model.gguf_tokenizer import GGUFVocab, tokenizer_from_gguf

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "12345 and 3.14, 1,000,000 or 2024-06-01",
    "Well... isn't it? Yes! (maybe) [ok] {x: 'y'} --- ***",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))",
    "emoji 😀🎉👍🏽 and 日本語のテキスト, русский текст, العربية, हिन्दी",
    "It's we'll they're I'M YOU'VE",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>",
    "",
    " ",
    "\n",
]
# Numerals beyond ASCII: SmolLM's tokenizer.json isolates every \p{N} (llama.cpp's "smollm" split does too).
NUMERALS = ["x² + y³ = ½", "① ② ③", "٣٤٥ and ३४५", "Ⅻ chapters, 10² steps"]


def _from_folder(path: Path) -> Any:
    """transformers' tokenizer for a GGUF file, read offline from the folder holding it."""
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def reader(smollm2_gguf: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def ours(reader: gguf.GGUFReader) -> GGUFVocab:
    return tokenizer_from_gguf(reader)


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path) -> Any:
    return _from_folder(smollm2_gguf)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encodes_as_transformers(ours: GGUFVocab, reference: Any, text: str) -> None:
    assert ours.tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_decodes_as_transformers_and_round_trips(ours: GGUFVocab, reference: Any, text: str) -> None:
    ids = ours.tokenizer.encode(text)
    assert ours.tokenizer.decode(ids, skip_special=False) == text
    for skip in (False, True):
        assert ours.tokenizer.decode(ids, skip_special=skip) == reference.decode(
            ids, skip_special_tokens=skip
        )


def test_smollm2_numerals_split_as_its_tokenizer_json(ours: GGUFVocab, reference: Any) -> None:
    # transformers' GGUF loader gives "smollm" plain GPT-2 splitting; the model's own tokenizer.json puts
    # Digits(individual_digits=True) first, so we compare with its backend given that pre-tokenizer.
    smollm = HFTokenizer.from_str(reference.backend_tokenizer.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in TEXTS + NUMERALS:
        assert ours.tokenizer.encode(text) == smollm.encode(text, add_special_tokens=False).ids, text


def test_smollm2_chat_tokens_are_one_id_each(ours: GGUFVocab) -> None:
    assert ours.tokenizer.encode("<|im_start|>") == [1]
    assert ours.tokenizer.encode("<|im_end|>") == [2]
    assert ours.tokenizer.encode("a<|im_start|>b")[1] == 1


def test_smollm2_special_ids_and_template_equal_the_metadata(
    ours: GGUFVocab, reader: gguf.GGUFReader
) -> None:
    def field(name: str) -> Any:
        return reader.fields[name].contents()

    tok = ours.tokenizer
    assert tok.bos_id == field("tokenizer.ggml.bos_token_id") == 1
    assert tok.eos_id == field("tokenizer.ggml.eos_token_id") == 2
    assert tok.pad_id == field("tokenizer.ggml.padding_token_id")
    assert tok.unk_id == field("tokenizer.ggml.unknown_token_id")
    assert (tok.specials.bos, tok.specials.eos) == ("<|im_start|>", "<|im_end|>")
    assert tok.vocab_size == len(field("tokenizer.ggml.tokens")) == 49152
    assert ours.add_bos is field("tokenizer.ggml.add_bos_token") is False
    assert ours.chat_template == field("tokenizer.chat_template")
    assert ours.chat_template is not None and "<|im_start|>" in ours.chat_template


# Tiny files written with gguf.GGUFWriter: GPT-2's 256 byte symbols, a few merges, two control tokens.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "o r", "Ġw or", "Ġ w", "' s", "Ċ Ċ"]
TINY_TEXTS = [
    "The theory and in or word's",
    "  two spaces\n\n\nthree newlines  ",
    "123456 7 89, I'M here",
    "<|bos|>the<|endoftext|>",
    "a<think>b",
]


def _byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _write(path: Path, model: str, tokens: list[str], types: list[int], **fields: Any) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if "pre" in fields:
        w.add_tokenizer_pre(fields["pre"])
    if "merges" in fields:
        w.add_token_merges(fields["merges"])
    if "scores" in fields:
        w.add_token_scores(fields["scores"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0 if model == "gpt2" else 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_bpe(tmp_path: Path, pre: str, model: str = "gpt2") -> Path:
    tokens = ["<|endoftext|>", "<|bos|>", *_byte_symbols(), *(m.replace(" ", "") for m in MERGES), "<think>"]
    types = [3, 3] + [1] * (len(tokens) - 3) + [4]
    return _write(tmp_path / f"tiny-{pre}.gguf", model, tokens, types, pre=pre, merges=MERGES)


def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(_tiny_bpe(tmp_path, "made-up-split"))
    with pytest.raises(ValueError, match="made-up-split"):
        tokenizer_from_gguf(reader)


def test_unknown_tokenizer_model_is_refused_by_name(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(_tiny_bpe(tmp_path, "gpt-2", model="bert"))
    with pytest.raises(ValueError, match="'bert'"):
        tokenizer_from_gguf(reader)


@pytest.mark.parametrize(("pre", "add_bos"), [("gpt-2", False), ("llama-bpe", True), ("qwen2", False)])
def test_tiny_byte_level_splits_as_transformers(tmp_path: Path, pre: str, add_bos: bool) -> None:
    path = _tiny_bpe(tmp_path, pre)
    ours, reference = tokenizer_from_gguf(gguf.GGUFReader(path)), _from_folder(path)
    for text in TINY_TEXTS:
        ids = ours.tokenizer.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.decode(ids, skip_special=False) == text
    assert ours.add_bos is add_bos  # llama.cpp's default for the split when the file does not say


SPM_PIECES = [
    "▁",
    "t",
    "h",
    "e",
    "a",
    "n",
    "d",
    "o",
    "w",
    "r",
    "l",
    "▁t",
    "he",
    "▁the",
    "▁a",
    "an",
    "▁an",
    "▁and",
]


@pytest.fixture
def tiny_spm(tmp_path: Path) -> Path:
    """A SentencePiece ('llama') vocabulary: <unk> <s> </s>, 256 byte tokens, pieces scored by rank."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(SPM_PIECES))]
    return _write(tmp_path / "tiny-spm.gguf", "llama", tokens, types, scores=scores)


def test_tiny_sentencepiece_encodes_as_transformers(tiny_spm: Path) -> None:
    ours, reference = tokenizer_from_gguf(gguf.GGUFReader(tiny_spm)), _from_folder(tiny_spm)
    for text in ["the and", "then a world", "héllo 😀", "\n\tx"]:
        ids = ours.tokenizer.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text
    assert ours.add_bos is True


def test_tiny_sentencepiece_spaces_as_llama_cpp(tiny_spm: Path) -> None:
    # llama.cpp (and SentencePiece) put one space before every stretch of text, even one that starts with
    # spaces or follows a special token; transformers' Metaspace skips both, so these are written out.
    tok = tokenizer_from_gguf(gguf.GGUFReader(tiny_spm)).tokenizer
    piece = {p: 259 + i for i, p in enumerate(SPM_PIECES)}
    assert tok.encode(" the") == [piece["▁"], piece["▁the"]]
    assert tok.encode("<s>the") == [1, piece["▁the"]]
    assert tok.encode("é") == [piece["▁"], 3 + 0xC3, 3 + 0xA9]  # byte fallback: <0xC3><0xA9>
    assert tok.decode(tok.encode(" the")) == " the"
