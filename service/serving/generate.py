"""POST /v1/generate's work: the native API, JSON or Server-Sent Events (one event per token, then `done`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from service.engine.request import AttentionSpec, StepOutput
from service.errors import APIError, error_data, output_error
from service.inspection.streaming import stream_spec, streamed_attention
from service.registry import ServedModel
from service.schemas.common import Usage
from service.schemas.inspection import AttentionStreamSpec
from service.schemas.native import GenerateRequest, GenerateResponse, Timing, TokenInfo
from service.serving import beam
from service.serving.common import omitted_max_tokens, sampling_params, sse
from service.serving.constraints import compiled, constraint_of
from service.settings import Settings


def _token_info(served: ServedModel, out: StepOutput, with_logprobs: bool) -> TokenInfo:
    assert out.token_id is not None
    tok = served.tokenizer
    top = {tok.token_text(t.token_id): t.logprob for t in out.top_logprobs} if out.top_logprobs else None
    return TokenInfo(token_id=out.token_id, text=out.text, logprob=out.logprob if with_logprobs else None,
                     top_logprobs=top)


def _attention_spec(served: ServedModel, spec: AttentionStreamSpec, stream: bool, num_tokens: int,
                    settings: Settings) -> AttentionSpec:
    """return_attention checked against the stream flag and the inspection limits; the engine's record of it."""
    if not stream:
        raise APIError(400, "return_attention needs stream: true (each token event carries its row)",
                       param="return_attention")
    if num_tokens > settings.inspect_max_tokens:
        raise APIError(413, f"with return_attention the prompt and max_tokens cover {num_tokens} tokens; the limit "
                       f"(inspect_max_tokens) is {settings.inspect_max_tokens}: lower max_tokens or shorten the "
                       "prompt", param="max_tokens", code="inspection_too_large")
    return stream_spec(served.checkpoint.config, spec.kinds, spec.layers, spec.heads, spec.aggregation)


def _usage(out: StepOutput) -> Usage:
    return Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                 total_tokens=out.num_prompt_tokens + out.num_output_tokens)


def _timing(out: StepOutput) -> Timing:
    return Timing(queue_time=out.queue_time, time_to_first_token=out.ttft, total_time=out.e2e)


class Generate:
    """The native API for one model: continue a prompt (a decoder-only model) or translate a source sentence (a
    translator); streamed token events with attention rows on request; beam search's best hypothesis."""

    def __init__(self, served: ServedModel, settings: Settings) -> None:
        self.served, self.settings = served, settings

    async def create(self, body: GenerateRequest, rid: str) -> GenerateResponse | AsyncIterator[str]:
        """The whole response, or (body.stream) its SSE events: `token` per token, then `done` (or `error`)."""
        served, settings = self.served, self.settings
        ids = served.tokenizer.encode(body.prompt)
        constraint, where = constraint_of(body)
        if body.beam_width is not None and body.beam_width > 1:
            if constraint is not None:
                raise APIError(400, f"beam_width cannot be combined with {where}", param=where)
            return await _beams(served, body, settings, rid, ids)
        params = sampling_params(body, settings, body.logprobs,
                                 default_max_tokens=omitted_max_tokens(served, ids, body.max_tokens), prompt=body.prompt)
        grammar = await compiled(served, constraint, where)
        req = served.make_request(rid, body.prompt, dataclasses.replace(params, constraint=constraint),
                                  prompt_ids=ids, grammar=grammar)
        if body.return_attention is not None:
            req.attention = _attention_spec(served, body.return_attention, body.stream,
                                            req.num_tokens + len(req.source_ids or []) + params.max_tokens,
                                            settings)
        stream = served.open(req)
        if body.stream:
            return _events(served, stream, body.logprobs is not None, req.attention)
        return await _collect(served, stream, req.request_id, body.logprobs is not None)


async def _beams(served: ServedModel, body: GenerateRequest, settings: Settings, rid: str,
                 ids: list[int]) -> GenerateResponse:
    assert body.beam_width is not None
    beam.check_beam(body, body.beam_width, "beam_width", settings)
    start = time.monotonic()
    results = await beam.run_all(served, body, settings, rid, [(body.prompt, ids)], body.beam_width,
                                 body.length_penalty, 1)
    best = results[0][0][0]
    return GenerateResponse(id=rid, model=served.name, text=served.tokenizer.decode(best.token_ids),
                            token_ids=best.token_ids, finish_reason=beam.finish_reason(best),
                            usage=beam.usage(results, 1), tokens=None,
                            timing=Timing(queue_time=None, time_to_first_token=None, total_time=time.monotonic() - start))


async def _collect(served: ServedModel, stream: AsyncIterator[StepOutput], rid: str, logprobs: bool) -> GenerateResponse:
    text, ids, tokens = [], [], []
    async with stream:  # type: ignore[attr-defined]
        async for out in stream:
            text.append(out.text)
            if out.token_id is not None:
                ids.append(out.token_id)
                if logprobs:
                    tokens.append(_token_info(served, out, True))
            if out.finished:
                if out.finish_reason == "error":
                    raise output_error(out)
                return GenerateResponse(id=rid, model=served.name, text="".join(text), token_ids=ids,
                                        finish_reason=out.finish_reason, usage=_usage(out), timing=_timing(out),
                                        tokens=tokens if logprobs else None)
    raise APIError(500, "generation ended without a result", "server_error")


async def _events(served: ServedModel, stream: AsyncIterator[StepOutput], logprobs: bool,
                  attention: AttentionSpec | None = None) -> AsyncIterator[str]:
    async with stream:  # type: ignore[attr-defined]
        async for out in stream:
            if out.token_id is not None:  # a TokenInfo, built as a dict: this runs once per token per stream
                data: dict[str, Any] = {"token_id": out.token_id, "text": out.text}
                if logprobs:
                    data.update(_token_info(served, out, True).model_dump(exclude_none=True))
                if attention is not None and out.attention is not None:
                    data["attention"] = streamed_attention(attention, out)
                yield sse(data, "token")
            elif out.text:
                yield sse({"text": out.text}, "token")
            if out.finished:
                if out.finish_reason == "error":
                    yield sse(error_data(output_error(out)), "error")
                    return
                yield sse({"finish_reason": out.finish_reason, "usage": _usage(out).model_dump(),
                           "timing": _timing(out).model_dump()}, "done")
                return
