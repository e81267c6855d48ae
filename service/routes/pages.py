"""The pages a person opens in a browser: `/` (where to go) and `/inspect` (the attention viewer). The API docs
(`/docs`, `/redoc`) are served by fastapi-offline from assets inside the package, so they work without internet."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).resolve().parent.parent / "static"
VIEWER_ASSETS = "/inspect/assets"
DOCS_ASSETS = "/docs/assets"

router = APIRouter(include_in_schema=False)

HOME = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attnserve</title>
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em}</style></head>
<body><h1>attnserve</h1>
<p>Transformers served over HTTP: continuous batching, streaming, an OpenAI-compatible API and attention
inspection.</p>
<ul>
<li><a href="/inspect">/inspect</a>: the attention viewer</li>
<li><a href="/docs">/docs</a>: the interactive API documentation (<a href="/redoc">ReDoc</a>,
<a href="/openapi.json">openapi.json</a>)</li>
<li><a href="/v1/models">/v1/models</a>: the served models</li>
<li><a href="/health">/health</a>, <a href="/ready">/ready</a>, <a href="/metrics">/metrics</a></li>
</ul></body></html>
"""


@router.get("/")
async def home() -> HTMLResponse:
    """Links to the viewer, the API docs and the models: the first page a new user opens."""
    return HTMLResponse(HOME)


@router.get("/inspect")
async def viewer() -> FileResponse:
    """The attention viewer (plain HTML + JS, works offline)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")
