"""Token views: each token's id, text, character span and flags, as the inspection response lists them."""

from __future__ import annotations

from typing import Any

from model.tokenizer import Tokenizer


def token_views(tok: Tokenizer, ids: list[int], spans: list[tuple[int, int] | None],
                generated_from: int) -> list[dict[str, Any]]:
    """id, text, character span and flags of each token; spans[i] is None for specials and unknown spans."""
    specials = tok.special_ids
    return [{"id": i, "text": tok.token_text(i), "start": sp[0] if sp else None, "end": sp[1] if sp else None,
             "special": i in specials, "generated": n >= generated_from} for n, (i, sp) in enumerate(zip(ids, spans,
                                                                                                    strict=True))]


def generated_spans(tok: Tokenizer, ids: list[int], base: int) -> list[tuple[int, int] | None]:
    """Spans of generated tokens in base + decode(ids): each token covers what it adds to the decoded text."""
    ends = [base + len(tok.decode(ids[: n + 1])) for n in range(len(ids))]
    starts = [base, *ends[:-1]]
    return [(s, max(s, e)) for s, e in zip(starts, ends, strict=True)]
