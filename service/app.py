"""`create_app(settings)`: the FastAPI application and its lifespan (load, warm up, serve, drain, stop)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.engine.engine import CALLER, Caller
from service.errors import error_body, install
from service.logs import setup_logging
from service.metrics import CONTENT_TYPE, Metrics
from service.registry import ServedModel, discover, load_models
from service.routes import attention, generate, health, models, openai, pages
from service.routes.pages import DOCS_ASSETS, STATIC, VIEWER_ASSETS
from service.settings import Settings, SettingsError

log = logging.getLogger("attnserve.app")

OPEN_PATHS = {"/", "/health", "/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", "/inspect"}
OPEN_PREFIXES = (VIEWER_ASSETS + "/", DOCS_ASSETS + "/")  # static files that hold no data: open like their pages
NO_DRAIN_PATHS = {"/health", "/ready", "/metrics"}
PROBE_PATHS = {"/health", "/ready"}  # access-logged only with log_probes: orchestrators call them every few seconds
TIMEOUT_HEADER = "x-request-timeout"  # seconds; generation still running then ends with finish_reason "abort"
LOGGED_PROMPT_CHARS = 2000


def _request_timeout(value: str | None) -> float | None:
    """The X-Request-Timeout header in seconds (None if absent); ValueError unless a positive finite number."""
    if value is None:
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(value)
    return seconds


async def drain_engines(app: FastAPI, timeout: float) -> None:
    """Stop taking requests; let in-flight ones finish within `timeout`, then abort the rest."""
    app.state.draining = True
    served: dict[str, ServedModel] = getattr(app.state, "models", {})
    await asyncio.gather(*(m.engine.drain(timeout) for m in served.values()))


def _route_template(request: Request) -> str:
    """The matched route's path template (`/v1/models/{model}`), never the raw path: bounded label values.
    Requests answered before routing (401, 413, 503 while draining) are matched here; the rest are "unmatched"."""
    route = request.scope.get("route")
    if route is None:
        route = next((r for r in request.app.router.routes if r.matches(request.scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


class BodyLimit:
    """Count a request body as it streams in and refuse it (413) past the limit: a chunked body has no
    Content-Length for the gatekeeper to check."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, f"request body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    setup_logging(settings.log_level, settings.log_json)
    metrics = Metrics()
    api_keys = [k.encode() for k in settings.all_api_keys()]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        found = [p.name for p in discover(settings)]
        if settings.default_model is not None and settings.default_model not in found:
            raise SettingsError(f"default model '{settings.default_model}' is not among the served models "
                                f"{sorted(found)}")
        app.state.models = load_models(settings, metrics.record_step, metrics.record_finish)
        for name, served in app.state.models.items():
            metrics.add_model(name, served.describe())
        names = list(app.state.models)
        app.state.default_model = settings.default_model or (names[0] if names else None)
        app.state.ready = True
        log.info("ready", extra={"models": names, "default_model": app.state.default_model})
        try:
            yield
        finally:
            app.state.ready = False
            await drain_engines(app, 0 if app.state.draining else settings.drain_timeout)
            for served in app.state.models.values():
                served.engine.stop()
                metrics.set_engine_up(served.name, False)

    app = FastAPIOffline(  # /docs and /redoc from assets in the package, not a CDN
        static_url=DOCS_ASSETS,
        title="attnserve",
        version=__version__,
        description="Serve Transformers with continuous batching, streaming, an OpenAI-compatible API, "
        "and attention inspection.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.models = {}
    app.state.default_model = None
    app.state.ready = False
    app.state.draining = False
    app.state.started = time.time()
    install(app)
    for router in (health.router, models.router, generate.router, openai.router, attention.router, pages.router):
        app.include_router(router)
    app.mount(VIEWER_ASSETS, StaticFiles(directory=STATIC), name="viewer-assets")

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        metrics.sample_engines(request.app.state.models)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # inside the gatekeeper: its 413 is logged

    @app.middleware("http")
    async def gatekeeper(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Request id, auth, body size, draining, access log and HTTP metrics: everything before a route."""
        start = time.monotonic()
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid[:128]
        path = request.url.path
        response: Response
        if api_keys and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES) and not (
                path == "/metrics" and not settings.metrics_require_auth):
            auth = request.headers.get("authorization", "")
            key = auth[7:].encode() if auth.lower().startswith("bearer ") else b""
            if not any(hmac.compare_digest(key, k) for k in api_keys):
                response = JSONResponse(error_body("invalid or missing API key (Authorization: Bearer <key>)",
                                                   "authentication_error", code="invalid_api_key"), 401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return _finish(request, response, start)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            response = JSONResponse(error_body(f"request body is {length} bytes; the limit is "
                                               f"{settings.max_body_bytes}", "invalid_request_error",
                                               code="body_too_large"), 413)
            metrics.record_rejection(None, "invalid")
            return _finish(request, response, start)
        if request.app.state.draining and path not in NO_DRAIN_PATHS:
            response = JSONResponse(error_body("the server is shutting down", "unavailable_error",
                                               code="shutting_down"), 503)
            return _finish(request, response, start)
        try:
            timeout = _request_timeout(request.headers.get(TIMEOUT_HEADER))
        except ValueError:
            response = JSONResponse(error_body("X-Request-Timeout must be a positive number of seconds",
                                               "invalid_request_error", "X-Request-Timeout", "invalid_value"), 400)
            metrics.record_rejection(None, "invalid")
            return _finish(request, response, start)
        caller = Caller(deadline=None if timeout is None else time.monotonic() + timeout)
        CALLER.set(caller)  # this task's context: the route's engine requests inherit the deadline
        response = await call_next(request)
        _finish(request, response, start, log_now=False)
        body = getattr(response, "body_iterator", None)
        if body is not None:  # log once the body is out: a stream's latency is its whole length
            response.body_iterator = _log_after(body, request, response.status_code, start, caller)  # type: ignore[attr-defined]
        else:
            _access_log(request, response.status_code, start, caller)
        return response

    def _finish(request: Request, response: Response, start: float, log_now: bool = True) -> Response:
        response.headers["X-Request-ID"] = request.state.request_id
        metrics.record_http(getattr(request.state, "model_name", None), _route_template(request),
                            request.method, response.status_code)
        if log_now:
            _access_log(request, response.status_code, start)
        return response

    def _access_log(request: Request, status: int, start: float, caller: Caller | None = None,
                    complete: bool = True) -> None:
        """One JSON line per HTTP request: id, route, status, latency and, for generation, token counts."""
        if request.url.path in PROBE_PATHS and not settings.log_probes:
            return
        extra: dict[str, object] = {
            "request_id": request.state.request_id, "method": request.method, "path": request.url.path,
            "status": status, "latency_ms": round((time.monotonic() - start) * 1000, 2),
            "model": getattr(request.state, "model_name", None)}
        if caller is not None and (caller.prompt_tokens or caller.completion_tokens):
            extra.update(prompt_tokens=caller.prompt_tokens, completion_tokens=caller.completion_tokens)
        if caller is not None and caller.prompt is not None:
            extra["prompt"] = caller.prompt[:LOGGED_PROMPT_CHARS]
        if not complete:
            extra["client_disconnected"] = True
        log.info("request", extra=extra)

    async def _log_after(body: AsyncIterable[Any], request: Request, status: int, start: float,
                         caller: Caller) -> AsyncIterator[Any]:
        complete = False
        try:
            async for chunk in body:
                yield chunk
            complete = True
        finally:
            _access_log(request, status, start, caller, complete)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    return app
