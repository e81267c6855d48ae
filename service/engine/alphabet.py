"""What a character-level vocabulary can spell. Such a model (the shipped shakespeare-gpt: one token per
character, no braces, quotes or most digits) cannot produce every string; a constraint whose every completion
needs a character it lacks is refused with that character named, instead of running into a dead end or into
max_tokens with half an answer. Byte-level vocabularies spell anything and are not checked.

The check compiles the constraint over a wide alphabet (printable ASCII and the vocabulary's characters) and walks
it depth first, taking only the vocabulary's characters, looking for one completion; when there is none, the
characters it wanted on the way are tried one at a time to name the one that would have made a completion. A
matcher state is known only by its token mask, so a mask met REPEAT times is taken to lead nowhere new (this ends
loops such as `[a-z]+@`); the search gives up, accepting the constraint, after BUDGET tokens or at MAX_DEPTH."""

from __future__ import annotations

import string
from collections import Counter
from typing import Any, Protocol

import numpy as np
import xgrammar as xgr
from torch import Tensor


class Vocabulary(Protocol):
    """What structured output reads of a model's tokenizer (model.tokenizer.Tokenizer is one)."""

    tok: Any  # the Hugging Face `tokenizers.Tokenizer`
    eos_id: int | None

    @property
    def special_ids(self) -> set[int]: ...

    @property
    def vocab_size(self) -> int: ...

REPEAT = 64
BUDGET = 20_000
MAX_DEPTH = 400
CANDIDATES = 8  # lacking characters tried one by one to find the one the constraint needs


class _GiveUp(Exception):
    pass


def _allowed(matcher: xgr.GrammarMatcher, mask: Tensor, n: int) -> np.ndarray:
    """The token ids the matcher allows next (its bitmask row, unpacked)."""
    matcher.fill_next_token_bitmask(mask)
    bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[:n]
    return np.flatnonzero(bits)


class Alphabet:
    """A character-level vocabulary: token id -> its character, and a compiler over a wider alphabet."""

    def __init__(self, chars: dict[int, str]) -> None:
        self.have = set(chars.values())
        self.wide = sorted(set(string.printable) - set("\x0b\x0c\r") | self.have)
        self.wide_index = {c: i for i, c in enumerate(self.wide)}
        info = xgr.TokenizerInfo([*self.wide, ""], xgr.VocabType.RAW, stop_token_ids=[len(self.wide)])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    @classmethod
    def of(cls, tok: Vocabulary, vocab_size: int, info: xgr.TokenizerInfo) -> Alphabet | None:
        """The alphabet of a raw vocabulary whose every ordinary token is one character; None otherwise."""
        if info.vocab_type != xgr.VocabType.RAW or tok.eos_id is None:
            return None
        specials = set(info.special_token_ids) | tok.special_ids
        chars: dict[int, str] = {}
        for i in range(min(vocab_size, tok.vocab_size)):
            piece = tok.tok.id_to_token(i)
            if i in specials or piece is None:
                continue
            if len(piece) != 1:
                return None
            chars[i] = piece
        return cls(chars)

    def missing(self, wide: xgr.CompiledGrammar) -> set[str]:
        """The characters the constraint needs and the vocabulary lacks, when no completion could be found: those
        of the wanted characters one of which, added to the vocabulary, would give a completion (else every one
        wanted on the way); empty when one was found (or the search gave up). `wide`: the constraint compiled by
        self.compiler."""
        found, lacking = self._search(wide, self.have, BUDGET)
        if found is not False:
            return set()
        enough = {c for c in sorted(lacking)[:CANDIDATES] if self._search(wide, self.have | {c}, BUDGET // 4)[0]}
        return enough or lacking

    def _search(self, wide: xgr.CompiledGrammar, chars: set[str], budget: int) -> tuple[bool | None, set[str]]:
        """(whether a completion over `chars` exists, None if the search gave up; the characters wanted on the
        way that `chars` lack)."""
        m = xgr.GrammarMatcher(wide)
        mask = xgr.allocate_token_bitmask(1, len(self.wide) + 1)
        seen: Counter[bytes] = Counter()
        lacking: set[str] = set()
        trials = 0

        def search(depth: int) -> bool:
            nonlocal trials
            allowed = _allowed(m, mask, len(self.wide) + 1)
            if len(self.wide) in allowed:
                return True  # the grammar may end here
            lacking.update(c for i in allowed if (c := self.wide[i]) not in chars)
            key = mask.numpy().tobytes()
            seen[key] += 1
            if seen[key] > REPEAT:
                return False
            if depth >= MAX_DEPTH:
                raise _GiveUp
            for i in allowed:
                if self.wide[i] not in chars:
                    continue
                trials += 1
                if trials > budget:
                    raise _GiveUp
                m.accept_token(int(i))
                if search(depth + 1):
                    return True
                m.rollback(1)
            return False

        try:
            return search(0), lacking
        except _GiveUp:
            return None, lacking

    def explain(self, lacking: set[str], what: str) -> str:
        need = ", ".join(repr(c) for c in sorted(lacking))
        return (f"no output this model can write satisfies the {what}: it needs {need}, which the model's "
                f"vocabulary lacks (one token per character: {''.join(sorted(self.have))!r})")
