"""POST /v1/completions's work: OpenAI's completions (n, stop, seed, logprobs, echo, streaming with [DONE]) and
vLLM's extras: prompt scoring (echo + logprobs, max_tokens 0, prompt_logprobs), its sampling fields and beam
search (use_beam_search, length_penalty)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from service.engine.request import SamplingParams, StepOutput
from service.engine.stream import RequestStream
from service.errors import APIError, error_data, output_error
from service.registry import ServedModel
from service.schemas.common import Usage
from service.schemas.openai import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from service.serving import beam
from service.serving import completion_logprobs as lps
from service.serving.common import check_token_ids, merge, omitted_max_tokens, sampling_params, sse
from service.serving.constraints import compiled, constraint_of
from service.settings import Settings


@dataclass
class _Choice:
    """One choice being assembled: its prompt, text so far and logprobs."""

    index: int
    prompt_text: str
    prompt_ids: list[int]
    from_text: bool
    prompt_tokens: int = 0
    prompt_index: int = 0  # which prompt of the request: its n choices share its tokens in usage
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs | None = None
    offset: int = 0  # where the next generated text starts in the choice's text
    started: bool = False  # the first output (with the prompt's log-probs) has arrived
    prompt_logprobs: list[Any] | None = None
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


def _check(body: CompletionRequest, served: ServedModel, settings: Settings) -> int | None:
    """Refuse what this server cannot do; the number of top log-probs to score the prompt with (None: unscored)."""
    if body.n > settings.max_n:
        raise APIError(400, f"n is {body.n}; the limit is {settings.max_n}", param="n")
    bad = body.unsupported()
    if bad is not None:
        raise APIError(400, f"{bad} is not supported by this server (value {getattr(body, bad)!r})", param=bad)
    scored = body.prompt_logprobs is not None or (body.echo and body.logprobs is not None)
    if body.max_tokens == 0 and not (body.echo or scored):
        raise APIError(400, "max_tokens is 0: only prompt scoring (echo, or prompt_logprobs) generates nothing",
                       param="max_tokens")
    if body.prompt_logprobs is not None and body.prompt_logprobs > settings.max_logprobs:
        raise APIError(400, f"prompt_logprobs is {body.prompt_logprobs}; the limit is {settings.max_logprobs}",
                       param="prompt_logprobs")
    if scored and served.is_encoder_decoder:
        param = "prompt_logprobs" if body.prompt_logprobs is not None else "echo"
        raise APIError(400, "prompt log-probs need a decoder-only model: a translator's prompt is its encoder's "
                       "source", param=param)
    return max(body.prompt_logprobs or 0, body.logprobs or 0) if scored else None


def _params(body: CompletionRequest, served: ServedModel, settings: Settings, ids: list[int], j: int,
            prompt_k: int | None) -> SamplingParams:
    params = sampling_params(body, settings, body.logprobs, seed_offset=j, prompt=body.prompt,
                             default_max_tokens=omitted_max_tokens(served, ids, body.max_tokens))
    return dataclasses.replace(params, prompt_logprobs=prompt_k)


class Completions:
    """OpenAI's completions for one model: prompts x n fanned out into engine streams (n choices share their
    prompt's blocks and count it once), echo and log-probs, usage, stop strings (the engine's), vLLM's beam search
    and prompt scoring, and the errors of each in one shape (service/errors.py)."""

    def __init__(self, served: ServedModel, settings: Settings) -> None:
        self.served, self.settings = served, settings

    async def create(self, body: CompletionRequest, rid: str) -> CompletionResponse | AsyncIterator[str]:
        """The whole response, or (body.stream) its SSE chunks ending in [DONE]; the engine requests are open
        when this returns and are aborted if the iterator or the awaiting task is dropped."""
        served, settings = self.served, self.settings
        prompt_k = _check(body, served, settings)
        prompts = _prompts(body, served)
        if len(prompts) * body.n > settings.max_n * 4:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceeds {settings.max_n * 4} choices", param="prompt")
        constraint, where = constraint_of(body)
        if body.use_beam_search:
            if constraint is not None:
                raise APIError(400, f"use_beam_search cannot be combined with {where}", param=where)
            return await _beams(body, served, settings, prompts, rid)
        grammar = await compiled(served, constraint, where)
        choices: list[_Choice] = []
        streams: list[RequestStream] = []
        async with AsyncExitStack() as stack:
            for pi, (text, given) in enumerate(prompts):
                ids = served.tokenizer.encode(text) if given is None else given
                for j in range(body.n):
                    params = dataclasses.replace(_params(body, served, settings, ids, j, prompt_k), constraint=constraint)
                    req = served.make_request(f"{rid}-{pi}-{j}", text, params, prompt_ids=ids, grammar=grammar)
                    stream = served.open(req, counts_prompt=j == 0)  # n choices share one prompt
                    await stack.enter_async_context(stream)  # aborts it if anything below fails
                    choice = _Choice(len(choices), text, req.prompt_ids, given is None, req.num_prompt_tokens,
                                     offset=len(text) if body.echo else 0, prompt_index=pi)
                    choices.append(choice)
                    streams.append(stream)
            pending = stack.pop_all()
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _chunks(served, body, rid, created, choices, streams, pending, include_usage)
        return await _collect(served, body, rid, created, choices, streams, pending)


async def _beams(body: CompletionRequest, served: ServedModel, settings: Settings,
                 prompts: list[tuple[str, list[int] | None]], rid: str) -> CompletionResponse:
    """vLLM's use_beam_search: n hypotheses per prompt, best first (index = prompt x n + rank)."""
    beam.check_beam(body, body.n, "n", settings)
    pairs = [(text, served.tokenizer.encode(text) if given is None else given) for text, given in prompts]
    results = await beam.run_all(served, body, settings, rid, pairs, body.n, body.length_penalty, body.n)
    choices = [CompletionChoice(index=i * body.n + r, text=served.tokenizer.decode(h.token_ids),
                                finish_reason=beam.finish_reason(h), prompt_logprobs=None)
               for i, (hyps, _) in enumerate(results) for r, h in enumerate(hyps[: body.n])]
    return CompletionResponse(id=rid, created=int(time.time()), model=served.name, choices=choices,
                              usage=beam.usage(results, body.n))


def _start(c: _Choice, served: ServedModel, body: CompletionRequest, out: StepOutput) -> CompletionLogprobs | None:
    """A choice's first output: its echoed prompt's log-probs (None without logprobs) and vLLM's prompt_logprobs."""
    c.started = True
    if body.prompt_logprobs is not None:
        c.prompt_logprobs = lps.vllm_prompt_logprobs(served, out.prompt_logprobs, body.prompt_logprobs)
    if body.logprobs is None:
        return None
    lp = CompletionLogprobs()
    if body.echo:
        offsets = lps.prompt_offsets(served, c.prompt_text, c.prompt_ids, c.from_text)
        lps.add_prompt(lp, served, c.prompt_ids, offsets, out.prompt_logprobs, body.logprobs)
    return lp


def _failed(out: StepOutput) -> bool:
    return out.finished and out.finish_reason == "error"


async def _collect(served: ServedModel, body: CompletionRequest, rid: str, created: int, choices: list[_Choice],
                   streams: list[RequestStream], pending: AsyncExitStack) -> CompletionResponse:
    async with pending:
        async for i, out in merge(streams):  # type: ignore[arg-type]
            c = choices[i]
            if _failed(out):
                raise output_error(out)
            if not c.started:
                c.logprobs = _start(c, served, body, out)
            if c.logprobs is not None:
                lps.add_token(c.logprobs, served, out, c.offset, body.logprobs or 0)
            c.text.append(out.text)
            c.offset += len(out.text)
            if out.finished:
                c.finish_reason, c.completion_tokens = out.finish_reason, out.num_output_tokens
    result = [CompletionChoice(index=c.index, text=(c.prompt_text if body.echo else "") + "".join(c.text),
                               logprobs=c.logprobs, finish_reason=c.finish_reason, prompt_logprobs=c.prompt_logprobs)
              for c in choices]
    return CompletionResponse(id=rid, created=created, model=served.name, choices=result, usage=_usage(choices))


def _usage(choices: list[_Choice]) -> Usage:
    prompt = sum({c.prompt_index: c.prompt_tokens for c in choices}.values())
    completion = sum(c.completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _chunks(served: ServedModel, body: CompletionRequest, rid: str, created: int, choices: list[_Choice],
                  streams: list[RequestStream], pending: AsyncExitStack, include_usage: bool) -> AsyncIterator[str]:
    # with include_usage every chunk carries usage, null until the last one (as OpenAI sends it)
    exclude = {"system_fingerprint"} if include_usage else {"usage", "system_fingerprint"}

    def chunk(c: _Choice, text: str, logprobs: CompletionLogprobs | None, finish: str | None,
              prompt_logprobs: list[Any] | None = None) -> str:
        choice = CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=finish,
                                  prompt_logprobs=prompt_logprobs)
        return sse(CompletionResponse(id=rid, created=created, model=served.name, choices=[choice]).model_dump(
            exclude=exclude))

    async with pending:
        async for i, out in merge(streams):  # type: ignore[arg-type]
            c = choices[i]
            if _failed(out):
                yield sse(error_data(output_error(out)))
                yield sse("[DONE]")
                return
            if not c.started:
                first = _start(c, served, body, out)
                if body.echo or c.prompt_logprobs is not None:  # the prompt's own chunk, before its first token
                    yield chunk(c, c.prompt_text if body.echo else "", first, None, c.prompt_logprobs)
            lp = None
            if body.logprobs is not None and out.token_id is not None:
                lp = CompletionLogprobs()
                lps.add_token(lp, served, out, c.offset, body.logprobs)
            c.offset += len(out.text)
            if out.finished:
                c.finish_reason, c.completion_tokens = out.finish_reason, out.num_output_tokens
                yield chunk(c, out.text, lp, out.finish_reason)
            elif out.text or lp is not None:
                yield chunk(c, out.text, lp, None)
    if include_usage:
        usage = CompletionResponse(id=rid, created=created, model=served.name, choices=[], usage=_usage(choices))
        yield sse(usage.model_dump(exclude={"system_fingerprint"}))
    yield sse("[DONE]")
