"""Beam search requests on /v1/completions (vLLM's `use_beam_search`, `n` = the beam width, `length_penalty`) and
/v1/generate (`beam_width`): checked, run through the engine (service/beam_search.py), answered best first."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from service.beam_search import Hypothesis, beam_search
from service.caller import CALLER
from service.engine.request import RequestStats
from service.errors import APIError
from service.registry import ServedModel
from service.schemas.common import Usage
from service.serving.common import omitted_max_tokens, sampling_params
from service.settings import Settings

# what a beam cannot honour: the value that asks for nothing, and why
_REFUSED: dict[str, tuple[object, str]] = {
    "stream": (False, "beam search returns whole hypotheses"),
    "echo": (False, "beam search returns the completions only"),
    "logprobs": (None, "beam search reports no per-token log-probs"),
    "prompt_logprobs": (None, "beam search does not score the prompt"),
    "stop": (None, "beam search ends hypotheses at EOS or max_tokens only"),
    "stop_token_ids": (None, "beam search ends hypotheses at EOS or max_tokens only"),
    "return_attention": (None, "attention rows are streamed for sampled tokens only"),
}


def check_beam(body: Any, width: int, field: str, settings: Settings) -> None:
    """400 for a beam request asking for what a beam cannot do, or wider than the server's n limit."""
    if width > settings.max_n:
        raise APIError(400, f"{field} is {width}; the limit is {settings.max_n}", param=field)
    for name, (nothing, why) in _REFUSED.items():
        value = getattr(body, name, nothing)
        if value not in (nothing, [], ""):
            raise APIError(400, f"{name} cannot be used with beam search: {why}", param=name)


async def run_beams(served: ServedModel, body: Any, settings: Settings, rid: str, prompt: str, ids: list[int],
                    width: int, alpha: float | None, returned: int) -> tuple[list[Hypothesis], int]:
    """Best-first hypotheses for one prompt, and its prompt-token count. The search's engine requests (one per
    hypothesis per step) are not counted; the user's request is, once, in the metrics and the access log: its
    prompt, and the tokens of the `returned` hypotheses it answers with, as its usage says."""
    params = sampling_params(body, settings, None, prompt=prompt,
                             default_max_tokens=omitted_max_tokens(served, ids, body.max_tokens))
    req = served.make_request(rid, prompt, params, prompt_ids=ids)
    served.engine.check(req)  # too long for the context, or the engine not taking requests: refused as usual
    start, beams, reason = time.monotonic(), [], "error"
    try:
        beams = await beam_search(served, rid, req.prompt_ids, req.source_ids, width, params.max_tokens, alpha)
        reason = finish_reason(beams[0])
    except asyncio.CancelledError:
        reason = "abort"
        raise
    finally:
        output = sum(len(h.token_ids) for h in beams[:returned])
        if served.engine.on_finish is not None:
            served.engine.on_finish(RequestStats(served.name, rid, reason, req.num_prompt_tokens, output, None, None,
                                                 time.monotonic() - start))
        caller = CALLER.get()
        if caller is not None:
            caller.prompt_tokens += req.num_prompt_tokens
            caller.completion_tokens += output
    return beams, req.num_prompt_tokens


async def run_all(served: ServedModel, body: Any, settings: Settings, rid: str, prompts: list[tuple[str, list[int]]],
                  width: int, alpha: float | None, returned: int) -> list[tuple[list[Hypothesis], int]]:
    return list(await asyncio.gather(*(run_beams(served, body, settings, f"{rid}-{i}", text, ids, width, alpha,
                                                 returned) for i, (text, ids) in enumerate(prompts))))


def usage(results: list[tuple[list[Hypothesis], int]], returned: int) -> Usage:
    """The prompts once each; the completion tokens of the hypotheses returned."""
    prompt = sum(p for _, p in results)
    completion = sum(len(h.token_ids) for beams, _ in results for h in beams[:returned])
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finish_reason(h: Hypothesis) -> str:
    return "stop" if h.finished else "length"
