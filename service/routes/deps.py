"""What every route needs: the model a request names, its sampling parameters within the limits, SSE framing,
and running a request so that a client who leaves aborts it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from service.engine.request import SamplingParams
from service.errors import APIError
from service.registry import ServedModel
from service.schemas import SamplingFields
from service.settings import Settings

T = TypeVar("T")


def served_model(request: Request, name: str | None) -> ServedModel:
    """The named model (404 if unknown) or the default one."""
    models: dict[str, ServedModel] = request.app.state.models
    if not models:
        raise APIError(503, "no model is loaded", "unavailable_error")
    if name is None:
        name = request.app.state.default_model
    served = models.get(name or "")
    if served is None:
        raise APIError(404, f"model '{name}' does not exist; available: {sorted(models)}", "not_found_error",
                       param="model", code="model_not_found")
    request.state.model_name = served.name
    return served


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def sampling_params(body: SamplingFields, settings: Settings, logprobs: int | None, seed_offset: int = 0) -> SamplingParams:
    """Check the limits that depend on settings and build the engine's SamplingParams."""
    if body.max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens is {body.max_tokens}; the limit is {settings.max_tokens_limit}",
                       param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > settings.max_stop_sequences:
        raise APIError(400, f"stop has {len(stop)} sequences; the limit is {settings.max_stop_sequences}", param="stop")
    for s in stop:
        if len(s) > settings.max_stop_length:
            raise APIError(400, f"a stop sequence has {len(s)} characters; the limit is {settings.max_stop_length}",
                           param="stop")
    if logprobs is not None and logprobs > settings.max_logprobs:
        raise APIError(400, f"logprobs is {logprobs}; the limit is {settings.max_logprobs}", param="logprobs")
    return SamplingParams(
        max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=None if body.seed is None else body.seed + seed_offset,
        stop=tuple(s for s in stop if s), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, logprobs=logprobs,
    )


def check_token_ids(served: ServedModel, ids: list[int], field: str) -> None:
    vocab = served.checkpoint.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"{field} has token id {bad[0]} outside the vocabulary [0, {vocab})", param=field)


def request_id(request: Request, prefix: str) -> str:
    rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    return f"{prefix}-{rid}-{uuid.uuid4().hex[:8]}"


def sse(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


async def until_disconnect(request: Request, work: Awaitable[T], poll: float = 0.05) -> T:
    """Await `work`, cancelling it (so its engine requests abort) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client closed the request", "client_closed")
    finally:
        if not task.done():
            task.cancel()


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
