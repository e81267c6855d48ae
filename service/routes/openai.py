"""POST /v1/completions: parse, one call into the serving layer (service/serving/completions.py), render."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.routes.deps import error_responses, serve
from service.schemas.openai import CompletionRequest, CompletionResponse
from service.serving.completions import Completions

router = APIRouter(tags=["openai"])
ERRORS = error_responses(400, 401, 404, 413, 429, 503)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/completions", response_model=CompletionResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true"}})
async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
    """OpenAI's completions API: n, stop, seed, logprobs, echo, and streaming chunks ending in `[DONE]`
    (`stream_options.include_usage` adds a usage chunk). `echo` with `logprobs` scores the prompt's tokens too,
    and `max_tokens: 0` with it only scores; vLLM's `prompt_logprobs` and sampling extras are accepted."""
    result = await serve(request, body, "cmpl", Completions)
    if isinstance(result, CompletionResponse):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)
