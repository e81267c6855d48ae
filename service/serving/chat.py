"""POST /v1/chat/completions's work: OpenAI's chat API (n, stop, seed, logprobs, tools, streaming deltas with
[DONE])."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from service.chat_template import ChatTemplateError
from service.engine.request import SamplingParams, StepOutput
from service.engine.stream import RequestStream
from service.errors import APIError, error_data, output_error
from service.registry import ServedModel
from service.schemas.chat import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
)
from service.schemas.common import Usage
from service.serving.chat_prompt import chat_prompt, check_supported
from service.serving.chat_tools import CallDeltas, ToolPlan, plan_tools, reply
from service.serving.common import merge, sampling_params, sse
from service.serving.constraints import compiled, constraint_of
from service.settings import Settings


@dataclass
class _Choice:
    """One reply being assembled: its text so far, logprobs and how it ended."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None


def _token_logprob(served: ServedModel, out: StepOutput) -> dict[str, Any] | None:
    """Chat's logprobs entry for one generated token (token, logprob, bytes, top_logprobs), as a plain dict."""
    if out.token_id is None or out.logprob is None:
        return None
    text = served.tokenizer.token_text

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        t = text(token_id)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode())}

    return {**entry(out.token_id, out.logprob),
            "top_logprobs": [entry(t.token_id, t.logprob) for t in out.top_logprobs]}


def _params_for(body: ChatCompletionRequest, served: ServedModel, settings: Settings, ids: list[int],
                top: int | None, j: int) -> SamplingParams:
    limit = settings.max_tokens_limit
    if body.max_completion_tokens is not None and body.max_completion_tokens > limit:
        raise APIError(400, f"max_completion_tokens is {body.max_completion_tokens}; the limit is {limit}",
                       param="max_completion_tokens")
    # omitted max_tokens: a translator sizes it to its source, an LM takes the room left in its context
    room = served.default_max_tokens(ids) or max(1, served.context_length - len(ids))
    return sampling_params(body.sampling(), settings, top, seed_offset=j, default_max_tokens=room,
                           prompt=[m.content for m in body.messages])


class Chat:
    """OpenAI's chat completions for one model: the chat template (or a plain one; a translator translates the
    last user message), n, stop, seed, logprobs / top_logprobs, tools and structured output, streaming deltas."""

    def __init__(self, served: ServedModel, settings: Settings) -> None:
        self.served, self.settings = served, settings

    async def create(self, body: ChatCompletionRequest, rid: str) -> ChatCompletionResponse | AsyncIterator[str]:
        """The whole response, or (body.stream) its SSE chunks ending in [DONE]."""
        served, settings = self.served, self.settings
        n = body.n or 1
        if n > settings.max_n:
            raise APIError(400, f"n is {n}; the limit is {settings.max_n}", param="n")
        check_supported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
        tools = plan_tools(body, served)
        constraint, where = constraint_of(body)
        if tools.constraint is not None:
            if constraint is not None:
                raise APIError(400, f"tool_choice and {where} both constrain the reply; give one", param=where)
            constraint, where = tools.constraint, "tools"
        try:
            text, ids = chat_prompt(served, body, tools.tools)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from e
        grammar = await compiled(served, constraint, where)
        choices: list[_Choice] = []
        streams: list[RequestStream] = []
        prompt_tokens = 0
        async with AsyncExitStack() as stack:
            for j in range(n):
                params = dataclasses.replace(_params_for(body, served, settings, ids, top, j), constraint=constraint)
                req = served.make_request(f"{rid}-{j}", text, params, prompt_ids=ids, grammar=grammar)
                prompt_tokens = req.num_prompt_tokens
                stream = served.open(req, counts_prompt=j == 0)  # n choices share one prompt
                await stack.enter_async_context(stream)  # aborts it if anything below fails
                choices.append(_Choice(j, logprobs=[] if top is not None else None))
                streams.append(stream)
            pending = stack.pop_all()
        created = int(time.time())
        if body.stream:
            opts = body.stream_options
            usage = "continuous" if opts and opts.include_usage and opts.continuous_usage_stats else (
                "final" if opts and opts.include_usage else None)
            return _chunks(served, rid, created, choices, streams, pending, prompt_tokens, usage, tools)
        return await _collect(served, rid, created, choices, streams, pending, prompt_tokens, tools)


def _usage(choices: list[_Choice], prompt_tokens: int) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _collect(served: ServedModel, rid: str, created: int, choices: list[_Choice], streams: list[RequestStream],
                   pending: AsyncExitStack, prompt_tokens: int, tools: ToolPlan) -> ChatCompletionResponse:
    async with pending:
        async for i, out in merge(streams):  # type: ignore[arg-type]
            c = choices[i]
            if c.logprobs is not None and (lp := _token_logprob(served, out)) is not None:
                c.logprobs.append(lp)
            c.text.append(out.text)
            if out.finished:
                if out.finish_reason == "error":
                    raise output_error(out)
                c.finish_reason, c.completion_tokens = out.finish_reason, out.num_output_tokens
    result = [ChatChoice(index=c.index, message=ChatResponseMessage(content=content, tool_calls=calls),
                         finish_reason=finish, logprobs=None if c.logprobs is None else ChatLogprobs(
                             content=[ChatTokenLogprob(**lp) for lp in c.logprobs]))
              for c in choices for content, calls, finish in [reply(tools, "".join(c.text), c.finish_reason)]]
    return ChatCompletionResponse(id=rid, created=created, model=served.name, choices=result,
                                  usage=Usage(**_usage(choices, prompt_tokens)))


async def _chunks(served: ServedModel, rid: str, created: int, choices: list[_Choice], streams: list[RequestStream],
                  pending: AsyncExitStack, prompt_tokens: int, usage: str | None, tools: ToolPlan
                  ) -> AsyncIterator[str]:
    """Per choice: a role delta, content deltas, then an empty delta with finish_reason; [DONE] last. Chunks are
    built as dicts (no pydantic model per token). `usage` "final" (include_usage): each chunk carries `usage: null`
    and a last chunk with no choices the usage; "continuous" (vLLM's continuous_usage_stats): each chunk carries
    the usage so far."""
    head: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name}
    if usage is not None:
        head["usage"] = None

    def chunk(index: int, delta: dict[str, Any], logprobs: list[dict[str, Any]] | None = None,
              finish: str | None = None) -> str:
        lp = None if logprobs is None else {"content": logprobs, "refusal": None}
        body = {**head, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        if usage == "continuous":
            body["usage"] = _usage(choices, prompt_tokens)
        return sse(body)

    calls = [CallDeltas(tools) for _ in choices] if tools.mode != "none" else None
    async with pending:
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": None if calls and tools.mode != "auto" else ""})
        async for i, out in merge(streams):  # type: ignore[arg-type]
            c = choices[i]
            lp = _token_logprob(served, out) if c.logprobs is not None else None
            c.completion_tokens += out.token_id is not None
            if calls is not None:
                for delta in calls[i].feed(out.text, out.finished):
                    yield chunk(c.index, delta)
            elif out.text or lp is not None:
                yield chunk(c.index, {"content": out.text}, None if lp is None else [lp])
            if out.finished:
                if out.finish_reason == "error":
                    yield sse(error_data(output_error(out)))
                    yield sse("[DONE]")
                    return
                c.finish_reason, c.completion_tokens = out.finish_reason, out.num_output_tokens
                yield chunk(c.index, {}, None, calls[i].finish(out.finish_reason) if calls else out.finish_reason)
    if usage is not None:
        yield sse({**head, "choices": [], "usage": _usage(choices, prompt_tokens)})
    yield sse("[DONE]")
