"""What every serving surface shares: the engine's sampling parameters from a request within the limits, a
model's defaults, token-id checks, SSE framing, and interleaving several engine streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any, TypeVar

from service.caller import CALLER
from service.engine.request import SamplingParams
from service.errors import APIError
from service.registry import ServedModel
from service.schemas.common import Sampling
from service.settings import Settings

T = TypeVar("T")

# The model the current HTTP request resolved to (set by served_model, in the request's own task): sampling_params
# reads its defaults here, so every surface that samples (generate, completions, chat, attention) applies them
# without each route passing the model along.
RESOLVED: ContextVar[ServedModel | None] = ContextVar("attnserve_resolved_model", default=None)

# Temperatures below this sample as greedy (as vLLM does): dividing logits by ~1e-300 overflows to inf.
GREEDY_BELOW = 1e-5
# A top_p this small already keeps the top token alone (for any vocabulary under a million tokens); a smaller
# one underflows to 0 in float32, which would filter out every token.
MIN_TOP_P = 1e-6


def model_defaults(served: ServedModel) -> dict[str, float]:
    """A model's own values for sampling fields a request omits (vLLM applies a checkpoint's generation_config the
    same way; an explicit value still wins). A translator decodes greedily: one source has one right translation,
    and sampled at temperature 1 it wanders off the source (its BLEU is measured greedy or with beams)."""
    return {"temperature": 0.0} if served.is_encoder_decoder else {}


def sampling_params(body: Sampling, settings: Settings, logprobs: int | None, seed_offset: int = 0,
                    default_max_tokens: int | None = None, prompt: object = None) -> SamplingParams:
    """Check the limits that depend on settings and build the engine's SamplingParams.

    `default_max_tokens` replaces the schema's default when the request gives none (a translator sizes it to its
    source: ServedModel.default_max_tokens); an omitted (or null) temperature takes the resolved model's default
    (model_defaults); `prompt` is what the access log shows with log_prompts."""
    max_tokens = body.max_tokens
    if "max_tokens" not in body.model_fields_set:  # the default is never refused, only capped
        max_tokens = min(default_max_tokens or max_tokens, settings.max_tokens_limit)
    elif max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens is {body.max_tokens}; the limit is {settings.max_tokens_limit}",
                       param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > settings.max_stop_sequences:
        raise APIError(400, f"stop has {len(stop)} sequences; the limit is {settings.max_stop_sequences}", param="stop")
    for s in stop:
        if len(s) > settings.max_stop_length:
            raise APIError(400, f"a stop sequence has {len(s)} characters; the limit is {settings.max_stop_length}",
                           param="stop")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens is {body.min_tokens}, more than max_tokens ({max_tokens})", param="min_tokens")
    if logprobs is not None and logprobs > settings.max_logprobs:
        raise APIError(400, f"logprobs is {logprobs}; the limit is {settings.max_logprobs}", param="logprobs")
    temperature = body.temperature
    served = RESOLVED.get()
    if "temperature" not in body.model_fields_set and served is not None:
        temperature = model_defaults(served).get("temperature", temperature)
    caller = CALLER.get()
    if settings.log_prompts and caller is not None:  # the access log line carries it; off by default
        caller.prompt = None if prompt is None else str(prompt)
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_k=max(body.top_k, 0), top_p=max(body.top_p, MIN_TOP_P), min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=None if body.seed is None else body.seed + seed_offset,
        stop=tuple(s for s in stop if s), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, logprobs=logprobs, min_tokens=body.min_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )


def omitted_max_tokens(served: ServedModel, prompt_ids: list[int], default: int) -> int:
    """max_tokens when a request gives none: a translator's sized to its source, an LM's `default` capped to the
    room its prompt leaves in the context (at least 1, so a prompt that fills it is refused as too long)."""
    return served.default_max_tokens(prompt_ids) or max(1, min(default, served.context_length - len(prompt_ids)))


def check_token_ids(served: ServedModel, ids: list[int], field: str) -> None:
    vocab = served.checkpoint.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"{field} has token id {bad[0]} outside the vocabulary [0, {vocab})", param=field)


def sse(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive, tagging each with its iterator's index."""
    queue: asyncio.Queue[tuple[int, T] | tuple[int, None]] = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        finally:
            await queue.put((i, done))  # type: ignore[arg-type]

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            yield i, item  # type: ignore[misc]
        for t in tasks:
            t.result()  # surface a pump's exception
    finally:
        for t in tasks:
            t.cancel()
