"""Training data: a character-level LM corpus (nanoGPT's split) and a parallel corpus for translation.

Both samplers draw their randomness from a `torch.Generator` they own, so a training run can save and restore
it (resuming then sees exactly the batches the uninterrupted run would have seen)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from model.tokenizer import Tokenizer

LANGS = ("en", "de")
SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr"}


# --- character-level language modelling ---------------------------------------------------------------------


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """nanoGPT's split: the first 90% of the characters train, the last 10% validate."""
    n = int(len(text) * train_fraction)
    return text[:n], text[n:]


def encode_chars(tokenizer: Tokenizer, text: str) -> Tensor:
    """Encode a long text character by character (a vocabulary lookup; same ids as `tokenizer.encode`)."""
    vocab = tokenizer.tok.get_vocab()
    unk = tokenizer.unk_id if tokenizer.unk_id is not None else 0
    return torch.tensor([vocab.get(c, unk) for c in text], dtype=torch.long)


class CharLMData:
    """A text file as one long token stream per split; batches are random (B, block) windows.

    `x` is a window and `y` the same window shifted by one character (next-character targets)."""

    def __init__(self, text: str, tokenizer: Tokenizer | None = None, train_fraction: float = 0.9) -> None:
        train_text, val_text = split_text(text, train_fraction)
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.train_char(train_text)
        self.splits = {"train": encode_chars(self.tokenizer, train_text), "val": encode_chars(self.tokenizer, val_text)}

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Tokenizer | None = None) -> CharLMData:
        return cls(Path(path).read_text(encoding="utf-8"), tokenizer)

    def batch(self, split: str, batch_size: int, block: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        data = self.splits[split]
        if len(data) <= block:
            raise ValueError(f"the {split} split ({len(data)} tokens) is shorter than block + 1 ({block + 1})")
        starts = torch.randint(len(data) - block, (batch_size,), generator=generator)
        x = torch.stack([data[i : i + block] for i in starts.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + block] for i in starts.tolist()])
        return x, y  # (B, block) each

    def eval_windows(self, split: str, block: int, batch_size: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        return eval_windows(self.splits[split], block, batch_size, limit)


def eval_windows(data: Tensor, block: int, batch_size: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Deterministic evaluation: consecutive non-overlapping windows of `block` tokens covering `data` (up to
    `limit` windows), so that every token but the first is predicted exactly once, with 0..block-1 tokens of
    context (a tail shorter than a window is dropped; a text shorter than one window is one short window)."""
    starts = list(range(0, len(data) - block, block))
    if not starts and len(data) > 1:
        block = len(data) - 1
        starts = [0]
    if limit is not None:
        starts = starts[:limit]
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        x = torch.stack([data[s : s + block] for s in chunk])
        y = torch.stack([data[s + 1 : s + 1 + block] for s in chunk])
        yield x, y


# --- translation --------------------------------------------------------------------------------------------


def read_lines(path: str | Path) -> list[str]:
    """Lines of a (gzip'd or plain) text file, without their newlines."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def parallel_files(folder: str | Path, split: str, src: str = "en", tgt: str = "de") -> tuple[Path, Path]:
    """multi30k's file names: {train,val,test_2016_flickr}.{en,de}.gz (plain .en/.de also accepted)."""
    folder = Path(folder)
    stem = SPLIT_FILES.get(split, split)
    out = []
    for lang in (src, tgt):
        candidates = [folder / f"{stem}.{lang}.gz", folder / f"{stem}.{lang}"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{candidates[0]} not found")
        out.append(found)
    return out[0], out[1]


def read_parallel(folder: str | Path, split: str, src: str = "en", tgt: str = "de") -> tuple[list[str], list[str]]:
    src_file, tgt_file = parallel_files(folder, split, src, tgt)
    a, b = read_lines(src_file), read_lines(tgt_file)
    if len(a) != len(b):
        raise ValueError(f"{src_file.name} has {len(a)} lines but {tgt_file.name} has {len(b)}")
    return a, b


@dataclass
class TranslationBatch:
    """Padded tensors for teacher forcing: tgt_in = BOS + y, tgt_out = y + EOS."""

    src: Tensor  # (B, S)
    src_valid: Tensor  # (B, S) bool
    tgt_in: Tensor  # (B, T)
    tgt_out: Tensor  # (B, T), pad positions hold `pad_id` (ignored by the loss)
    tgt_valid: Tensor  # (B, T) bool

    @property
    def num_tokens(self) -> int:
        return int(self.tgt_valid.sum())

    def to(self, device: torch.device | str) -> TranslationBatch:
        return TranslationBatch(*(t.to(device) for t in (self.src, self.src_valid, self.tgt_in, self.tgt_out, self.tgt_valid)))


def _pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    return out, valid


class TranslationData:
    """Tokenized sentence pairs, grouped into length-bucketed batches of at most `max_tokens` tokens.

    Pairs are sorted by (target, source) length and cut into batches, so each batch holds sentences of similar
    length and little padding; the order of the batches is shuffled each epoch by the caller's generator."""

    def __init__(
        self,
        sources: list[str],
        targets: list[str],
        tokenizer: Tokenizer,
        max_len: int = 128,
        drop_long: bool = True,
    ) -> None:
        if tokenizer.bos_id is None or tokenizer.eos_id is None or tokenizer.pad_id is None:
            raise ValueError("the tokenizer needs BOS, EOS and PAD tokens")
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.sources, self.targets = sources, targets
        src_ids = [tokenizer.encode(s) for s in sources]
        tgt_ids = [tokenizer.encode(t) for t in targets]
        keep = [
            i for i in range(len(sources))
            if not drop_long or (0 < len(src_ids[i]) <= max_len and len(tgt_ids[i]) + 1 <= max_len)
        ]
        self.index = keep  # positions in the original files
        self.src_ids = [src_ids[i][:max_len] for i in keep]
        self.tgt_ids = [tgt_ids[i][: max_len - 1] for i in keep]

    def __len__(self) -> int:
        return len(self.src_ids)

    def make_batch(self, ids: list[int]) -> TranslationBatch:
        src, src_valid = _pad([self.src_ids[i] for i in ids], self.pad_id)
        tgt_in, tgt_valid = _pad([[self.bos_id, *self.tgt_ids[i]] for i in ids], self.pad_id)
        tgt_out, _ = _pad([[*self.tgt_ids[i], self.eos_id] for i in ids], self.pad_id)
        return TranslationBatch(src, src_valid, tgt_in, tgt_out, tgt_valid)

    def buckets(self, max_tokens: int) -> list[list[int]]:
        """Batches of example indices, sorted by length, each with at most `max_tokens` padded tokens on the
        longer side (source or target) -- deterministic."""
        order = sorted(range(len(self)), key=lambda i: (len(self.tgt_ids[i]), len(self.src_ids[i]), i))
        batches: list[list[int]] = []
        cur: list[int] = []
        width = 0
        for i in order:
            w = max(width, len(self.tgt_ids[i]) + 1, len(self.src_ids[i]))
            if cur and w * (len(cur) + 1) > max_tokens:
                batches.append(cur)
                cur, width = [], 0
                w = max(len(self.tgt_ids[i]) + 1, len(self.src_ids[i]))
            cur.append(i)
            width = w
        if cur:
            batches.append(cur)
        return batches

    def epoch(self, max_tokens: int, generator: torch.Generator) -> list[list[int]]:
        """This epoch's batches in a random order (drawn from `generator`)."""
        batches = self.buckets(max_tokens)
        perm = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[p] for p in perm]

    def eval_batches(self, max_tokens: int) -> Iterator[TranslationBatch]:
        for ids in self.buckets(max_tokens):
            yield self.make_batch(ids)
