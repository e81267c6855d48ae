"""POST /v1/attention: parse, one call into the serving layer (service/serving/attention.py), render (JSON or a
PNG)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from service.routes.deps import error_responses, serve
from service.schemas.inspection import AttentionDryRun, AttentionRequest, AttentionResponse
from service.serving.attention import Attention

router = APIRouter(tags=["attention"])
ERRORS = error_responses(400, 401, 404, 413, 429, 503)


def _gate(app: FastAPI) -> asyncio.Semaphore:
    """One capture pass at a time per server (created on the server's own loop)."""
    gate: asyncio.Semaphore | None = getattr(app.state, "inspect_gate", None)
    if gate is None:
        gate = app.state.inspect_gate = asyncio.Semaphore(1)
    return gate


@router.post("/v1/attention", response_model=AttentionResponse | AttentionDryRun, responses={
    **ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON, or a PNG heatmap when format is png"}})
async def attention(body: AttentionRequest, request: Request) -> Any:
    """The softmax attention of one teacher-forced pass (generated first with `generate`), selected by kind,
    layer, head and query rows; aggregated, rolled out, summarized, sparsified; JSON, base64 or a PNG heatmap.
    `dry_run` reports the size without computing; past the limits a 413 names a selection that fits."""
    gate = _gate(request.app)
    result = await serve(request, body, "insp", lambda served, settings: Attention(served, settings, gate))
    if isinstance(result, bytes):
        return Response(result, media_type="image/png")
    return result
