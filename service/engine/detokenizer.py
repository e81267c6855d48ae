"""Incremental detokenization and stop strings, per request.

Text is emitted only when it is final: never half of a UTF-8 character (a byte-level token can end mid
character, which decodes to U+FFFD), and never a piece that could still turn into a stop string."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (the prefix/read-offset scheme of vLLM and TGI)."""

    def __init__(self, decode: Decode, stop: Sequence[str] = (), include_stop: bool = False) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop  # keep the stop string that ended the text (vLLM's option)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all final text so far (emitted + held back)
        self.emitted = 0  # characters of `text` already sent
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; return the text that became final (maybe ""). Sets `stopped` on a stop string."""
        self.ids.append(token_id)
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) < len(prefix):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [(i, i + len(s)) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
            if hits:
                first, end = min(hits)
                self.text = self.text[: end if self.include_stop else first]
                self.stopped = True
                return self.flush()
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = max(self.emitted, len(self.text) - hold)
        else:
            end = len(self.text)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta

    def flush(self) -> str:
        """At the end: whatever was held back (a possible stop string, a cut UTF-8 character) is final now."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self.decode(self.ids[self.prefix_offset :])[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta
