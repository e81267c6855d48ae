"""POST /v1/generate: parse, one call into the serving layer (service/serving/generate.py), render."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.routes.deps import error_responses, serve
from service.routes.openai import SSE_HEADERS
from service.schemas.native import GenerateRequest, GenerateResponse
from service.serving.generate import Generate

router = APIRouter(tags=["generate"])
ERRORS = error_responses(400, 401, 404, 413, 429, 503)


@router.post("/v1/generate", response_model=GenerateResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"}})
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse | StreamingResponse:
    """Continue a prompt (a decoder-only model) or translate a source sentence (a translator). JSON, or with
    `stream` Server-Sent Events: one `token` event per token (with `return_attention`, its attention row), then
    `done` with finish_reason, usage and timing. A translator's default max_tokens is sized to its source.
    `beam_width` > 1 answers with the best hypothesis of a beam search (JSON only)."""
    result = await serve(request, body, "gen", Generate)
    if isinstance(result, GenerateResponse):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)
