"""Everything before a route, as plain ASGI middleware: request id, auth, body size, draining, the request's
deadline, HTTP metrics and the access log.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`: that one passes every streamed chunk through a memory
stream and a task switch, which measured ~40% of the event loop's time at 32 streams of SSE tokens."""

from __future__ import annotations

import hmac
import logging
import math
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.caller import CALLER, Caller
from service.errors import error_body
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("attnserve.app")

OPEN_PATHS = {"/", "/health", "/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", "/inspect"}
NO_DRAIN_PATHS = {"/health", "/ready", "/metrics"}
PROBE_PATHS = {"/health", "/ready"}  # access-logged only with log_probes: orchestrators call them every few seconds
TIMEOUT_HEADER = "x-request-timeout"  # seconds; generation still running then ends with finish_reason "abort"
LOGGED_PROMPT_CHARS = 2000


def request_timeout(value: str | None) -> float | None:
    """The X-Request-Timeout header in seconds (None if absent); ValueError unless a positive finite number."""
    if value is None:
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(value)
    return seconds


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/v1/models/{model}`), never the raw path: bounded label values.
    Requests answered before routing (401, 413, 503 while draining) are matched here; the rest are "unmatched"."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in scope["app"].router.routes if r.matches(scope)[0] == Match.FULL), None)
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


class Gatekeeper:
    """Plain ASGI middleware in front of every route (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, api_keys: list[bytes],
                 open_prefixes: tuple[str, ...] = ()) -> None:
        self.app, self.settings, self.metrics, self.api_keys = app, settings, metrics, api_keys
        self.open_prefixes = open_prefixes  # static files that hold no data: open like their pages

    def _refusal(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        path, s = scope["path"], self.settings
        if self.api_keys and path not in OPEN_PATHS and not path.startswith(self.open_prefixes) and not (
                path == "/metrics" and not s.metrics_require_auth):
            auth = headers.get("authorization", "")
            key = auth[7:].encode() if auth.lower().startswith("bearer ") else b""
            if not any(hmac.compare_digest(key, k) for k in self.api_keys):
                return JSONResponse(error_body("invalid or missing API key (Authorization: Bearer <key>)",
                                               "authentication_error", code="invalid_api_key"), 401,
                                    headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > s.max_body_bytes:
            self.metrics.record_rejection(None, "invalid")
            return JSONResponse(error_body(f"request body is {length} bytes; the limit is {s.max_body_bytes}",
                                           "invalid_request_error", code="body_too_large"), 413)
        if scope["app"].state.draining and path not in NO_DRAIN_PATHS:
            return JSONResponse(error_body("the server is shutting down", "unavailable_error",
                                           code="shutting_down"), 503)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        headers = Headers(scope=scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = (headers.get("x-request-id") or uuid.uuid4().hex)[:128]
        status, complete, caller = 500, False, None

        async def send_with_id(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", state["request_id"].encode())]
                self.metrics.record_http(state.get("model_name"), route_template(scope), scope["method"], status)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            refusal = self._refusal(scope, headers)
            if refusal is None:
                try:
                    timeout = request_timeout(headers.get(TIMEOUT_HEADER))
                except ValueError:
                    self.metrics.record_rejection(None, "invalid")
                    refusal = JSONResponse(error_body("X-Request-Timeout must be a positive number of seconds",
                                                      "invalid_request_error", "X-Request-Timeout",
                                                      "invalid_value"), 400)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
                return
            caller = Caller(deadline=None if timeout is None else time.monotonic() + timeout)
            CALLER.set(caller)  # this task's context: the route's engine requests inherit the deadline
            await self.app(scope, receive, send_with_id)
        finally:
            self._access_log(scope, state, status, start, caller, complete)

    def _access_log(self, scope: Scope, state: dict[str, Any], status: int, start: float, caller: Caller | None,
                    complete: bool) -> None:
        """One JSON line per HTTP request: id, route, status, latency and, for generation, token counts."""
        if scope["path"] in PROBE_PATHS and not self.settings.log_probes:
            return
        extra: dict[str, object] = {
            "request_id": state["request_id"], "method": scope["method"], "path": scope["path"], "status": status,
            "latency_ms": round((time.monotonic() - start) * 1000, 2), "model": state.get("model_name")}
        if caller is not None and (caller.prompt_tokens or caller.completion_tokens):
            extra.update(prompt_tokens=caller.prompt_tokens, completion_tokens=caller.completion_tokens)
        if caller is not None and caller.prompt is not None:
            extra["prompt"] = caller.prompt[:LOGGED_PROMPT_CHARS]
        if not complete:
            extra["client_disconnected"] = True
        log.info("request", extra=extra)
