"""Log-probs of a completion choice in OpenAI's shape (tokens, token_logprobs, top_logprobs, text_offset) and in
vLLM's prompt_logprobs shape, from the engine's outputs: the prompt's tokens (with echo) and each generated one.

As vLLM does, a position's top_logprobs holds the top N and the token actually there (N + 1 entries when it is
not among them); text_offset is where the token starts in the choice's text, the echoed prompt included."""

from __future__ import annotations

from service.engine.request import PromptLogprob, StepOutput, TokenLogprob
from service.registry import ServedModel
from service.schemas.openai import CompletionLogprobs, PromptTokenLogprob


def prompt_offsets(served: ServedModel, text: str, ids: list[int], from_text: bool) -> list[int]:
    """Where each prompt token starts in the echoed prompt text: the tokenizer's offsets for a text prompt, the
    length of the decoded tokens before it for a token-id prompt (whose echo is their decoded text)."""
    tok = served.tokenizer
    if from_text:
        encoded, spans = tok.encode_with_offsets(text)
        if encoded == ids:
            return [start for start, _ in spans]
    return [len(tok.decode(ids[:i])) for i in range(len(ids))]


def _top(served: ServedModel, top: tuple[TokenLogprob, ...], n: int, token_id: int, logprob: float
         ) -> dict[str, float]:
    text = served.tokenizer.token_text
    out = {text(t.token_id): t.logprob for t in top[:n]}
    out.setdefault(text(token_id), logprob)
    return out


def add_prompt(lp: CompletionLogprobs, served: ServedModel, ids: list[int], offsets: list[int],
               scores: tuple[PromptLogprob | None, ...] | None, n: int) -> None:
    """The echoed prompt's tokens: the first has no log-prob (nothing predicts it), each other one its own and
    the top `n` at its position."""
    for i, token_id in enumerate(ids):
        entry = scores[i] if scores is not None and i < len(scores) else None
        lp.tokens.append(served.tokenizer.token_text(token_id))
        lp.token_logprobs.append(None if entry is None else entry.logprob)
        lp.top_logprobs.append(None if entry is None else _top(served, entry.top_logprobs, n, token_id, entry.logprob))
        lp.text_offset.append(offsets[i])


def add_token(lp: CompletionLogprobs, served: ServedModel, out: StepOutput, offset: int, n: int) -> None:
    """One generated token, starting at `offset` in the choice's text."""
    if out.token_id is None or out.logprob is None:
        return
    lp.tokens.append(served.tokenizer.token_text(out.token_id))
    lp.token_logprobs.append(out.logprob)
    lp.top_logprobs.append(_top(served, out.top_logprobs, n, out.token_id, out.logprob))
    lp.text_offset.append(offset)


def vllm_prompt_logprobs(served: ServedModel, scores: tuple[PromptLogprob | None, ...] | None, n: int
                         ) -> list[dict[str, PromptTokenLogprob] | None]:
    """vLLM's prompt_logprobs: per prompt position None (the first) or token id -> log-prob, rank (1 = the most
    likely; None where the token is not in the top N) and text, for the token there and the top `n`."""
    text = served.tokenizer.token_text
    result: list[dict[str, PromptTokenLogprob] | None] = []
    for entry in scores or ():
        if entry is None:
            result.append(None)
            continue
        top = entry.top_logprobs[:n]
        ranks = {t.token_id: r for r, t in enumerate(top, start=1)}
        row = {str(entry.token_id): PromptTokenLogprob(logprob=entry.logprob, rank=ranks.get(entry.token_id),
                                                       decoded_token=text(entry.token_id))}
        for t in top:
            row.setdefault(str(t.token_id), PromptTokenLogprob(logprob=t.logprob, rank=ranks[t.token_id],
                                                               decoded_token=text(t.token_id)))
        result.append(row)
    return result
