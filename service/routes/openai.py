"""POST /v1/completions: OpenAI's completions API (n, stop, seed, logprobs, echo, streaming with [DONE])."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.engine.engine import RequestStream
from service.engine.request import StepOutput
from service.errors import APIError
from service.registry import ServedModel
from service.routes.deps import (
    check_token_ids,
    error_responses,
    merge,
    request_id,
    sampling_params,
    served_model,
    settings_of,
    sse,
    until_disconnect,
)
from service.schemas.common import Usage
from service.schemas.openai import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse

router = APIRouter(tags=["openai"])
ERRORS = error_responses(400, 401, 404, 413, 429, 503)


@dataclass
class _Choice:
    """One choice being assembled: its prompt, text so far and logprobs."""

    index: int
    prompt_text: str
    prompt_tokens: int = 0
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs | None = None
    offset: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


def _prompts(body: CompletionRequest, served: ServedModel) -> list[tuple[str, list[int] | None]]:
    """(text, token ids or None) per prompt, from any of the four shapes OpenAI accepts."""
    p = body.prompt
    if isinstance(p, str):
        return [(p, None)]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    items: list[Any] = list(p)
    if all(isinstance(x, str) for x in items):
        return [(x, None) for x in items]
    groups: list[list[int]] = [items] if all(isinstance(x, int) for x in items) else [list(x) for x in items]
    out: list[tuple[str, list[int] | None]] = []
    for ids in groups:
        check_token_ids(served, ids, "prompt")
        out.append((served.tokenizer.decode(ids), ids))
    return out


def _add_token(choice: _Choice, served: ServedModel, out: StepOutput) -> None:
    if choice.logprobs is None or out.token_id is None:
        return
    tok = served.tokenizer
    lp = choice.logprobs
    lp.tokens.append(tok.token_text(out.token_id))
    lp.token_logprobs.append(out.logprob)
    lp.top_logprobs.append({tok.token_text(t.token_id): t.logprob for t in out.top_logprobs} or None)
    lp.text_offset.append(choice.offset)


@router.post("/v1/completions", response_model=CompletionResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true"}})
async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
    """OpenAI's completions API: n, stop, seed, logprobs, echo, and streaming chunks ending in `[DONE]`
    (`stream_options.include_usage` adds a usage chunk). Works with the official openai client."""
    served = served_model(request, body.model)
    settings = settings_of(request)
    if body.n > settings.max_n:
        raise APIError(400, f"n is {body.n}; the limit is {settings.max_n}", param="n")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    prompts = _prompts(body, served)
    if len(prompts) * body.n > settings.max_n * 4:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceeds {settings.max_n * 4} choices", param="prompt")
    rid = request_id(request, "cmpl")
    choices: list[_Choice] = []
    streams: list[RequestStream] = []
    async with AsyncExitStack() as stack:
        for pi, (text, ids) in enumerate(prompts):
            ids = served.tokenizer.encode(text) if ids is None else ids
            for j in range(body.n):
                params = sampling_params(body, settings, body.logprobs, seed_offset=j,
                                         default_max_tokens=served.default_max_tokens(ids), prompt=body.prompt)
                req = served.make_request(f"{rid}-{pi}-{j}", text, params, prompt_ids=ids)
                stream = served.engine.open(req)
                await stack.enter_async_context(stream)  # aborts it if anything below fails
                choice = _Choice(len(choices), text, len(req.prompt_ids if not req.source_ids else req.source_ids))
                if body.logprobs is not None:
                    choice.logprobs = CompletionLogprobs()
                choices.append(choice)
                streams.append(stream)
        pending = stack.pop_all()
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chunks(served, body, rid, created, choices, streams, pending, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await until_disconnect(request, _collect(served, body, rid, created, choices, streams, pending))


async def _collect(served: ServedModel, body: CompletionRequest, rid: str, created: int, choices: list[_Choice],
                   streams: list[RequestStream], pending: AsyncExitStack) -> CompletionResponse:
    async with pending:
        async for i, out in merge(streams):  # type: ignore[arg-type]
            c = choices[i]
            _add_token(c, served, out)
            c.text.append(out.text)
            c.offset += len(out.text)
            if out.finished:
                if out.finish_reason == "error":
                    raise APIError(500, out.error or "generation failed", "server_error")
                c.finish_reason, c.completion_tokens = out.finish_reason, out.num_output_tokens
    result = [CompletionChoice(index=c.index, text=(c.prompt_text if body.echo else "") + "".join(c.text),
                               logprobs=c.logprobs, finish_reason=c.finish_reason) for c in choices]
    return CompletionResponse(id=rid, created=created, model=served.name, choices=result, usage=_usage(choices))


def _usage(choices: list[_Choice]) -> Usage:
    prompt = sum({c.prompt_text: c.prompt_tokens for c in choices}.values())
    completion = sum(c.completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _chunks(served: ServedModel, body: CompletionRequest, rid: str, created: int, choices: list[_Choice],
                  streams: list[RequestStream], pending: AsyncExitStack, include_usage: bool) -> AsyncIterator[str]:
    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, finish: str | None) -> str:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        return sse(CompletionResponse(id=rid, created=created, model=served.name, choices=[choice]).model_dump(
            exclude={"usage", "system_fingerprint"}))

    async with pending:
        if body.echo:
            for c in choices:
                yield chunk(c.index, c.prompt_text, None, None)
        async for i, out in merge(streams):  # type: ignore[arg-type]
            c = choices[i]
            lp = None
            if c.logprobs is not None and out.token_id is not None:
                lp = CompletionLogprobs()
                _add_token(_Choice(c.index, "", logprobs=lp, offset=c.offset), served, out)
            c.offset += len(out.text)
            if out.finished:
                if out.finish_reason == "error":
                    yield sse({"error": {"message": out.error or "generation failed", "type": "server_error",
                                         "param": None, "code": None}})
                    yield sse("[DONE]")
                    return
                c.finish_reason, c.completion_tokens = out.finish_reason, out.num_output_tokens
                yield chunk(c.index, out.text, lp, out.finish_reason)
            elif out.text or lp is not None:
                yield chunk(c.index, out.text, lp, None)
    if include_usage:
        usage = CompletionResponse(id=rid, created=created, model=served.name, choices=[], usage=_usage(choices))
        yield sse(usage.model_dump(exclude={"system_fingerprint"}))
    yield sse("[DONE]")
