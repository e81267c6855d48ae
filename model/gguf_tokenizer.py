"""A `Tokenizer` rebuilt from the vocabulary a GGUF file carries in its `tokenizer.ggml.*` metadata.

A GGUF has no tokenizer.json: it stores tokens, merges (or scores), token types and two names, the
tokenizer model (`gpt2` byte-level BPE, `llama` SentencePiece) and the pre-tokenizer (`smollm`,
`llama-bpe`, ...). The split each pre-tokenizer name stands for is llama.cpp's (src/llama-vocab.cpp,
`llm_tokenizer_bpe`), written here as the `tokenizers` pieces of the model's own tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from model.tokenizer import SpecialTokens, Tokenizer

# The GPT-2 split, as in tokenizers' ByteLevel(use_regex=True) and llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's tokenizer.json (llama.cpp writes the (?i:...) out as character classes; same language).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's tokenizer.json: as Llama 3 but one digit per piece.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT, applied in turn, each to the pieces the one before left.
DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")


def _splits_then_bytes(*patterns: str) -> pre_tokenizers.PreTokenizer:
    """Each regex isolates its matches in the pieces so far, then bytes become GPT-2's printable alphabet."""
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
    return pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm() -> pre_tokenizers.PreTokenizer:
    # SmolLM's tokenizer.json; llama.cpp: "\p{N}" then the GPT-2 split.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one `tokenizer.ggml.pre` name splits text, and the llama.cpp defaults that come with it."""

    build: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False  # a piece that is itself a token is taken whole (Llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token
    nfc: bool = False  # the reference tokenizer.json normalizes to NFC (Qwen2; llama.cpp does not)


_LLAMA3 = PreTokenizerSpec(lambda: _splits_then_bytes(LLAMA3_SPLIT), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizerSpec(lambda: _splits_then_bytes(QWEN2_SPLIT), nfc=True)

# Names as llama.cpp's llama_vocab::load spells them; a file without the key is llama.cpp's "default".
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": PreTokenizerSpec(lambda: _splits_then_bytes(*DEFAULT_SPLITS)),
    "gpt-2": PreTokenizerSpec(_gpt2),
    "gpt2": PreTokenizerSpec(_gpt2),
    "smollm": PreTokenizerSpec(_smollm),
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}


@dataclass(frozen=True)
class GGUFVocab:
    """A GGUF file's tokenizer, whether prompts start with BOS, and its Jinja chat template if it has one."""

    tokenizer: Tokenizer
    add_bos: bool
    chat_template: str | None


def _field(reader: gguf.GGUFReader, name: str, default: Any = None) -> Any:
    field = reader.fields.get(name)
    return default if field is None else field.contents()


def _byte_level_vocab(tokens: list[str], types: list[int]) -> dict[str, int]:
    """token -> id; a plain token outside GPT-2's byte alphabet is respelled in it, as transformers does."""
    spell = _byte_chars()
    alphabet = set(spell)
    vocab = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == gguf.TokenType.NORMAL and not set(token) <= alphabet:
            token = "".join(spell[b] for b in token.encode("utf-8"))
        vocab[token] = i
    return vocab


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: byte b -> the printable character that stands for it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _gpt2_tokenizer(reader: gguf.GGUFReader, tokens: list[str], types: list[int]) -> tuple[HFTokenizer, bool]:
    """Byte-level BPE (`tokenizer.ggml.model` gpt2) and llama.cpp's default for adding BOS."""
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {sorted(PRE_TOKENIZERS)}"
        )
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    bpe = models.BPE(
        vocab=_byte_level_vocab(tokens, types),
        merges=merges,
        ignore_merges=spec.ignore_merges,
        fuse_unk=False,
    )
    tok = HFTokenizer(bpe)
    if spec.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = spec.build()
    tok.decoder = decoders.ByteLevel()
    return tok, spec.add_bos


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) whose join is a token, best-scored join first: SentencePiece's merge order."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = [
        (scores[i], ids[t[:k]], ids[t[k:]])
        for i, t in enumerate(tokens)
        for k in range(1, len(t))
        if t[:k] in ids and t[k:] in ids
    ]
    found.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(tokens[left], tokens[right]) for _, left, right in found]


def _llama_tokenizer(reader: gguf.GGUFReader, tokens: list[str], unk: str | None) -> tuple[HFTokenizer, bool]:
    """SentencePiece BPE (`tokenizer.ggml.model` llama: Llama 2, Mistral, TinyLlama) with byte fallback."""
    arch = _field(reader, "general.architecture")
    if arch in ("gemma", "gemma2", "gemma3", "phi3"):
        # Their files store tokens and merge order differently (transformers' gguf_tokenizer_mapping.py).
        raise ValueError(f"unsupported GGUF tokenizer model 'llama' for architecture {arch!r}")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    if not merges:
        merges = _merges_from_scores(tokens, _field(reader, "tokenizer.ggml.scores"))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # As llama.cpp and SentencePiece: one space before every stretch of text (the first, and each after an
    # added token) even one that starts with spaces; Metaspace would skip it there.
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return tok, True


_SPECIAL = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)


def _add_control_tokens(tok: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """CONTROL and UNKNOWN tokens become special, USER_DEFINED ones plain added tokens: all are matched whole."""
    special = [t for t, k in zip(tokens, types, strict=True) if k in _SPECIAL]
    user = [t for t, k in zip(tokens, types, strict=True) if k == gguf.TokenType.USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    for i, (t, k) in enumerate(zip(tokens, types, strict=True)):
        if (k in _SPECIAL or k == gguf.TokenType.USER_DEFINED) and tok.token_to_id(t) != i:
            raise ValueError(f"GGUF token {i} {t!r} is listed twice; its id would be ambiguous")


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> GGUFVocab:
    """The tokenizer a GGUF file embeds: ids equal llama.cpp's and the reference tokenizer's for the file."""
    kind = _field(reader, "tokenizer.ggml.model")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens", [])
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)

    def name(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    specials = SpecialTokens(bos=name("bos"), eos=name("eos"), pad=name("padding"), unk=name("unknown"))
    if kind == "gpt2":
        tok, add_bos = _gpt2_tokenizer(reader, tokens, types)
    elif kind == "llama":
        tok, add_bos = _llama_tokenizer(reader, tokens, specials.unk)
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r} (tokenizer.ggml.model); supported: ['gpt2', 'llama']"
        )
    _add_control_tokens(tok, tokens, types)
    return GGUFVocab(
        tokenizer=Tokenizer(tok, specials),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
