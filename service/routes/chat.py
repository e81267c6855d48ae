"""POST /v1/chat/completions: parse, one call into the serving layer (service/serving/chat.py), render."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.routes.deps import error_responses, serve
from service.routes.openai import SSE_HEADERS
from service.schemas.chat import ChatCompletionRequest, ChatCompletionResponse
from service.serving.chat import Chat

router = APIRouter(tags=["openai"])
ERRORS = error_responses(400, 401, 404, 413, 429, 503)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true"}})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | StreamingResponse:
    """OpenAI's chat API: the checkpoint's chat template (or a plain "role: content" one; a translator translates
    the last user message), n, stop, seed, logprobs/top_logprobs, and streaming deltas ending in `[DONE]`
    (`stream_options.include_usage` adds a usage chunk). Works with the official openai client."""
    result = await serve(request, body, "chatcmpl", Chat)
    if isinstance(result, ChatCompletionResponse):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)
