"""Character-level and BPE tokenizers, both Hugging Face `tokenizers` objects saved as one tokenizer.json."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


@dataclass(frozen=True)
class SpecialTokens:
    """Names of the special tokens; GPT-2 uses one <|endoftext|> for BOS and EOS and has no PAD."""

    bos: str | None = BOS
    eos: str | None = EOS
    pad: str | None = PAD
    unk: str | None = UNK

    def names(self) -> list[str]:
        return [t for t in dict.fromkeys([self.pad, self.bos, self.eos, self.unk]) if t is not None]


class Tokenizer:
    """Text <-> token ids, with BOS/EOS/PAD/UNK ids and character offsets for the inspection API."""

    def __init__(self, tok: HFTokenizer, specials: SpecialTokens = SpecialTokens()) -> None:
        self.tok = tok
        self.specials = specials
        self.bos_id = self._id(specials.bos)
        self.eos_id = self._id(specials.eos)
        self.pad_id = self._id(specials.pad)
        self.unk_id = self._id(specials.unk)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def special_ids(self) -> set[int]:
        return {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id) if i is not None}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids + (
            [self.eos_id] if add_eos and self.eos_id is not None else []
        )

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]  # type: ignore[misc]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        """The text one token stands for on its own (byte-level tokens decoded; specials by name)."""
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return ""
        if token_id in self.special_ids:
            return piece
        return self.tok.decode([token_id], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def from_file(cls, path: str | Path, specials: SpecialTokens = SpecialTokens()) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(path)), specials)

    @classmethod
    def train_char(cls, text: str) -> Tokenizer:
        """One token per character seen in `text` (+ specials), ids in sorted character order after them."""
        specials = SpecialTokens()
        chars = sorted(set(text))
        vocab = {t: i for i, t in enumerate(specials.names())}
        for c in chars:
            vocab.setdefault(c, len(vocab))
        tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(specials.names())
        return cls(tok, specials)

    @classmethod
    def train_bpe(cls, texts: Iterable[str] | Iterator[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Byte-level BPE (as GPT-2) learned from `texts`; every string round-trips, nothing is unknown."""
        specials = SpecialTokens()
        tok = HFTokenizer(models.BPE(unk_token=None))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials.names(),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, specials)
