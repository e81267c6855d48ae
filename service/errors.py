"""Errors to HTTP, in one place: every failure leaves as OpenAI's error shape with a 4xx/5xx status that says
whose fault it was. Nothing internal (stack traces, file paths) reaches the client."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.engine import InvalidRequest
from service.engine.request import (
    EngineDead,
    EngineError,
    EngineOverloaded,
    EngineStopped,
    RequestTooLong,
    StepOutput,
)
from service.inspection.selection import SelectionError

log = logging.getLogger("attnserve.http")


class APIError(Exception):
    """An error the client should see as is."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def output_error(out: StepOutput) -> APIError:
    """What a request whose engine output ended in error leaves with (as a JSON error, or an SSE error event's
    data via error_data): 503 when its engine stopped under it (retry), 500 when the model failed on it."""
    if out.error_code == "engine_dead":
        return APIError(503, out.error or "the engine stopped", "unavailable_error", code="engine_dead",
                        headers={"Retry-After": "1"})
    return APIError(500, out.error or "generation failed", "server_error", code=out.error_code or "generation_failed")


def error_data(e: APIError) -> dict[str, Any]:
    return error_body(e.message, e.type, e.param, e.code)


def engine_error(e: EngineError) -> APIError:
    """The one mapping from engine errors to HTTP statuses."""
    if isinstance(e, RequestTooLong):
        return APIError(400, str(e), param="prompt", code="context_length_exceeded")
    if isinstance(e, InvalidRequest):
        return APIError(400, str(e), param="prompt", code="invalid_value")
    if isinstance(e, EngineOverloaded):
        return APIError(429, f"server overloaded: {e}; retry later", "overloaded_error", code="overloaded",
                        headers={"Retry-After": str(max(1, round(e.retry_after)))})
    if isinstance(e, EngineStopped):
        return APIError(503, str(e), "unavailable_error", code="shutting_down")
    if isinstance(e, EngineDead):
        return APIError(503, "the model engine stopped; the service needs a restart", "unavailable_error",
                        code="engine_dead")
    return APIError(500, "internal error", "server_error")


def rejection_reason(status: int, code: str | None) -> str | None:
    """Why a request was refused before any engine took it (for metrics); None for everything else: auth
    failures, unknown paths, client disconnects (499: those are aborts) and server faults."""
    if status == 429:
        return "overload"
    if code == "context_length_exceeded":
        return "too_long"
    if status in (400, 413, 415, 422) or code == "model_not_found":
        return "invalid"
    return None


_TYPE_TAGS = {"body", "query", "path", "header", "str", "int", "float", "bool", "list", "dict"}


def _field(loc: tuple[Any, ...]) -> str:
    """`prompt.0`, never the union member tags pydantic puts in locations (`constrained-str`, `list[int]`)."""
    parts = [str(p) for p in loc if isinstance(p, int) or (str(p).isidentifier() and p not in _TYPE_TAGS)]
    return ".".join(parts) or "body"


def _not_json(request: Request, exc: RequestValidationError) -> APIError | None:
    """415 for a body sent without a JSON Content-Type (curl -d sends x-www-form-urlencoded): FastAPI then leaves
    it unparsed, and "body: Input should be a valid dictionary" would not say what to change. 415 Unsupported Media
    Type is the status for content in a format the resource does not take (RFC 9110 15.5.16)."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not isinstance(exc.body, bytes) or kind == "application/json" or kind.endswith("+json"):
        return None
    got = f"Content-Type {kind}" if kind else "no Content-Type"
    return APIError(415, f"the request body must be JSON, sent with the header `Content-Type: application/json` "
                    f"(this request had {got})", param="body", code="unsupported_media_type")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into OpenAI's error shape."""

    def respond(request: Request, err: APIError) -> JSONResponse:
        reason = rejection_reason(err.status, err.code)
        metrics = getattr(request.app.state, "metrics", None)
        if reason is not None and metrics is not None:
            metrics.record_rejection(getattr(request.state, "model_name", None), reason)
        return JSONResponse(error_body(err.message, err.type, err.param, err.code), err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return respond(request, engine_error(exc))

    @app.exception_handler(SelectionError)
    async def _selection(request: Request, exc: SelectionError) -> JSONResponse:
        return respond(request, APIError(400, str(exc), param=exc.param, code="invalid_selection"))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        not_json = _not_json(request, exc)
        if not_json is not None:
            return respond(request, not_json)
        errors = exc.errors()
        # for a union field, the branch whose type matched says more than "should be a valid string"
        first: dict[str, Any] = next((e for e in errors if not str(e.get("type", "")).endswith("_type")),
                                     errors[0] if errors else {"loc": ("body",), "msg": "invalid request"})
        if first.get("type") == "json_invalid":  # loc is ("body", <character offset>)
            where = first.get("loc", ("body", "?"))[-1]
            error = (first.get("ctx") or {}).get("error", "malformed")
            return respond(request, APIError(400, f"body: not valid JSON ({error} at character {where})",
                                             param="body", code="invalid_json"))
        field = _field(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid value"))
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return respond(request, APIError(400, f"{field}: {msg}{more}", param=field, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:  # a streamed (chunked) body went over the limit while it was read
            limit = request.app.state.settings.max_body_bytes
            return respond(request, APIError(413, f"request body is over the limit of {limit} bytes", param="body",
                                             code="body_too_large"))
        kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return respond(request, APIError(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), 500)
