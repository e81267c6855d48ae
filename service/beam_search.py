"""Beam search through the engine, the way vLLM's OpenAI server runs it: each step asks the engine for every live
hypothesis's next-token log-probs (one request per hypothesis, `max_tokens` 1, the top 2 x width), batched with
whatever else the engine is running, and keeps the best `width` continuations.

Hypotheses fork through prefix caching (service/engine/prefix_cache.py): a hypothesis's request shares every
full block its parent computed and copies the computed tokens of the block it diverges in (copy on write), so a
step computes one token per hypothesis. The rules are the reference decoder's (`model.generate.beam_search`):
a candidate ending in EOS is finished with score log p / GNMT length penalty, the search stops once `width` are
finished, and at the length limit the live ones compete as they are; hypotheses come back best first."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from model.generate import GenerationConfig, length_penalty
from service.engine.request import Request, SamplingParams, TokenLogprob
from service.registry import ServedModel


@dataclass(frozen=True)
class Hypothesis:
    token_ids: list[int]  # generated, without the EOS that finished it
    score: float  # cumulative log-prob / length penalty
    finished: bool  # it ended with EOS (else at max_tokens or the context's end)


async def _next(served: ServedModel, rid: str, prompt: list[int], source: list[int] | None,
                params: SamplingParams) -> tuple[TokenLogprob, ...]:
    """The top log-probs of the token after `prompt`, from one engine request."""
    step = Request(rid, prompt, params, source_ids=source, counted=False)  # the search reports the user's once
    async with served.open(step) as stream:
        async for out in stream:
            if out.finish_reason == "error":
                raise RuntimeError(out.error or "generation failed")
            if out.token_id is not None:
                return out.top_logprobs
    raise RuntimeError("the engine returned no token")


async def beam_search(served: ServedModel, rid: str, prompt_ids: list[int], source_ids: list[int] | None,
                      width: int, max_tokens: int, alpha: float | None = None) -> list[Hypothesis]:
    """The hypotheses of a beam of `width` after `prompt_ids` (a translator's: [BOS], given `source_ids`); alpha
    None is the reference decoder's default (0.6, the paper's with beam 4)."""
    alpha = GenerationConfig.length_penalty if alpha is None else alpha
    eos = served.tokenizer.eos_id
    max_len = served.engine.config.max_model_len
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * width, ignore_eos=True)
    beams: list[tuple[list[int], float]] = [([], 0.0)]  # tokens, cumulative log-prob
    finished: list[Hypothesis] = []
    n = len(prompt_ids)
    for t in range(max_tokens):
        if n + t >= max_len:
            break
        tops = await asyncio.gather(*(_next(served, f"{rid}-{t}-{b}", prompt_ids + toks, source_ids, params)
                                      for b, (toks, _) in enumerate(beams)))
        candidates = sorted(((score + c.logprob, b, c.token_id) for b, (_, score) in enumerate(beams)
                             for c in tops[b]), key=lambda c: -c[0])[: 2 * width]
        kept: list[tuple[list[int], float]] = []
        for s, b, tok in candidates:
            if tok == eos:
                finished.append(Hypothesis(beams[b][0], s / length_penalty(t + 1, alpha), True))
            else:
                kept.append((beams[b][0] + [tok], s))
            if len(kept) == width:
                break
        if len(finished) >= width:
            break
        beams = kept
    if len(finished) < width:
        finished += [Hypothesis(toks, s / length_penalty(len(toks), alpha), False) for toks, s in beams]
    return sorted(finished, key=lambda h: -h.score)
