"""The caller's side of a request: the async stream of its outputs, and the engine thread's outbox that feeds
the streams once per step."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from service.engine.request import Request, StepOutput


class Aborter(Protocol):
    def abort(self, request_id: str) -> None: ...


class RequestStream:
    """Async iterator over one request's StepOutputs; as a context manager it aborts on early exit."""

    def __init__(self, engine: Aborter, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.request, self.loop = engine, request, loop
        self.on_close: Callable[[Request], None] | None = None  # called once the stream is left, by any path
        self.queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        self.finished = out.finished
        return out

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.finished:
            self.engine.abort(self.request.request_id)
        if self.on_close is not None:
            self.on_close(self.request)


def deliver(items: list[tuple[RequestStream, StepOutput]]) -> None:
    """Runs on the event loop: hand each output to its stream."""
    for stream, out in items:
        stream.queue.put_nowait(out)


class Outbox:
    """The engine thread's outputs of one step, handed to each event loop with one `call_soon_threadsafe`."""

    def __init__(self) -> None:
        self.items: list[tuple[RequestStream, StepOutput]] = []

    def add(self, stream: RequestStream, out: StepOutput) -> None:
        self.items.append((stream, out))

    def flush(self) -> None:
        batch, self.items = self.items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, StepOutput]]] = {}
        for stream, out in batch:
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(deliver, items)


def run_for(fn: Callable[[], Any], future: asyncio.Future[Any]) -> None:
    """Run fn on this (engine) thread for a caller awaiting `future` on its event loop; skipped when the caller
    has gone (cancelled), and an exception reaches the caller, never the engine."""
    if future.cancelled():
        return
    try:
        result, error = fn(), None
    except Exception as e:
        result, error = None, e

    def settle() -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
        future.get_loop().call_soon_threadsafe(settle)
