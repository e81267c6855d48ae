"""What every route needs from the HTTP request: the model it names, the settings, its id, and running its work
so that a client who leaves aborts it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import Request

from service.errors import APIError
from service.registry import ServedModel
from service.schemas.common import ErrorResponse
from service.serving.common import RESOLVED
from service.settings import Settings

T = TypeVar("T")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the error statuses a route can answer, all in OpenAI's error shape."""
    return {s: {"model": ErrorResponse} for s in statuses}

def served_model(request: Request, name: str | None) -> ServedModel:
    """The named model (404 if unknown) or the default one."""
    models: dict[str, ServedModel] = request.app.state.models
    if not models:
        raise APIError(503, "no model is loaded", "unavailable_error")
    if name is None:
        name = request.app.state.default_model
    served = models.get(name or "")
    if served is None:
        raise APIError(404, f"model '{name}' does not exist; available: {sorted(models)}", "not_found_error",
                       param="model", code="model_not_found")
    request.state.model_name = served.name
    RESOLVED.set(served)
    return served


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def request_id(request: Request, prefix: str) -> str:
    rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    return f"{prefix}-{rid}-{uuid.uuid4().hex[:8]}"


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (so its engine requests abort) as soon as the client goes away.

    The body has been read, so the next ASGI message is the disconnect: wait for it rather than poll
    `request.is_disconnected()`, which cannot see through a `BaseHTTPMiddleware`'s receive."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise APIError(499, "client closed the request", "client_closed")
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


R = TypeVar("R", covariant=True)


class Surface(Protocol[R]):
    """A serving-layer object (service/serving/): one model's surface, one call per HTTP request."""

    async def create(self, body: Any, rid: str) -> R: ...


async def serve(request: Request, body: Any, prefix: str, surface: Callable[[ServedModel, Settings], Surface[T]]) -> T:
    """A route's one call: the model the body names, the server's settings and a request id `prefix-...` given to
    the surface, whose `create` runs until it answers or the client goes away (then it is cancelled)."""
    serving = surface(served_model(request, body.model), settings_of(request))
    return await until_disconnect(request, serving.create(body, request_id(request, prefix)))

