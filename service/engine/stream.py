"""The caller's side of a request: the async stream of its outputs, and the engine thread's outbox that feeds
the streams once per step."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol

from service.engine.detokenizer import Decode, IncrementalDetokenizer
from service.engine.request import Request, StepOutput


class Aborter(Protocol):
    def abort(self, request_id: str, stopped: bool = False) -> None: ...

    def overflowed(self, request_id: str) -> None: ...


class Sink(Protocol):
    """Where a step's outputs go: streams on event loops (Outbox), or a core process's batches."""

    def add(self, stream: Any, out: StepOutput) -> None: ...

    def flush(self) -> None: ...


class RequestStream:
    """Async iterator over one request's StepOutputs; as a context manager it aborts on early exit.

    The stream turns the engine's tokens into text (given the tokenizer's `decode`): incremental, UTF-8 safe, with
    the request's stop strings, on the server's side while the engine runs the next step. A stop string ends the
    output here and stops the engine's request (it may have run steps further, a burst's: those tokens are not
    the output's). A reader that falls `backlog` outputs behind (a client that stopped reading) gets an error and
    its request is aborted, so that nothing grows without bound for it: counted before each hand-over, since a
    decode burst hands over up to --num-scheduler-steps outputs of one stream at once, and not while the reader
    waits on the stream itself (woken, not yet run: the event loop's lag, not the reader's; a reader behind its
    client's socket waits elsewhere)."""

    def __init__(self, engine: Aborter, request: Request, loop: asyncio.AbstractEventLoop, backlog: int = 1024,
                 decode: Decode | None = None) -> None:
        self.engine, self.request, self.loop, self.backlog = engine, request, loop, backlog
        params = request.params
        self.detok = None if decode is None else IncrementalDetokenizer(decode, params.stop,
                                                                        params.include_stop_str_in_output)
        self.closed = False  # its last output is queued: later ones (a step past a stop string) are dropped
        self.on_close: Callable[[RequestStream], None] | None = None  # called once the stream is left, by any path
        self.num_output_tokens = 0  # as the latest output said (the engine's Request may be in another process)
        self.queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.finished = False
        self.overflowed = False
        self.behind = 0  # outputs its reader had not taken when the current hand-over began
        self.waiting = False  # the reader awaits this stream's next output

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        self.waiting = self.queue.empty()
        try:
            out = await self.queue.get()
        finally:
            self.waiting = False
        self.finished = out.finished
        self.num_output_tokens = max(self.num_output_tokens, out.num_output_tokens)
        return out

    def put(self, out: StepOutput) -> None:
        """On the event loop: queue an output, or end the stream when its reader is `backlog` behind."""
        if self.overflowed or self.closed:
            return
        out = self._text(out)
        if self.behind >= self.backlog and not out.finished:
            self.overflowed = True
            self.engine.overflowed(self.request.request_id)
            out = StepOutput(self.request.request_id, None, "", finished=True, finish_reason="error",
                             error=f"the stream fell {self.backlog} outputs behind its reader; request aborted",
                             error_code="slow_reader")
        self.queue.put_nowait(out)
        self.closed = out.finished

    def _text(self, out: StepOutput) -> StepOutput:
        """The output with its text delta; a stop string ends it (finish_reason stop) and stops the engine's
        request. An ending output gets the text held back (a possible stop string, a cut UTF-8 character)."""
        detok = self.detok
        if detok is None:
            return out
        text = ""
        if out.token_id is not None and not out.stop_token:
            text = detok.add(out.token_id)
            if detok.stopped:
                self.engine.abort(out.request_id, stopped=True)
                return dataclasses.replace(out, text=text, finished=True, finish_reason="stop")
        if out.finished and out.finish_reason != "error":
            text += detok.flush()
        return dataclasses.replace(out, text=text) if text else out

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.finished:
            self.engine.abort(self.request.request_id)
        if self.on_close is not None:
            self.on_close(self)


def deliver(items: list[tuple[RequestStream, StepOutput]]) -> None:
    """Runs on the event loop: hand each output to its stream."""
    for stream, _ in items:
        stream.behind = 0 if stream.waiting else stream.queue.qsize()
    for stream, out in items:
        stream.put(out)


class Outbox:
    """The engine thread's outputs of one step, handed to each event loop with one `call_soon_threadsafe`."""

    def __init__(self) -> None:
        self.items: list[tuple[RequestStream, StepOutput]] = []

    def add(self, stream: RequestStream, out: StepOutput) -> None:
        self.items.append((stream, out))

    def flush(self) -> None:
        batch, self.items = self.items, []
        hand_over(batch)


def hand_over(items: list[tuple[RequestStream, StepOutput]]) -> None:
    """From another thread: each event loop gets its streams' outputs with one `call_soon_threadsafe`."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, StepOutput]]] = {}
    for stream, out in items:
        by_loop.setdefault(stream.loop, []).append((stream, out))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(deliver, batch)


def run_for(fn: Callable[[], Any], future: asyncio.Future[Any]) -> None:
    """Run fn on this (engine) thread for a caller awaiting `future` on its event loop; skipped when the caller
    has gone (cancelled), and an exception reaches the caller, never the engine."""
    if future.cancelled():
        return
    try:
        result = fn()
    except Exception as e:
        result = e
    settle(future, result)


def settle(future: asyncio.Future[Any], result: Any) -> None:
    """From another thread: give `future` its result (an exception is raised to its awaiter), unless it is done."""

    def put() -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
        future.get_loop().call_soon_threadsafe(put)


class Drainable(Protocol):
    accepting: bool
    dead: str | None

    def abort(self, request_id: str, stopped: bool = False) -> None: ...


async def drain(engine: Drainable, live: Mapping[str, Any], timeout: float) -> None:
    """Stop the engine taking requests; wait up to `timeout` s for the `live` ones, then abort those left."""
    engine.accepting = False
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline and not engine.dead:
        await asyncio.sleep(0.05)
    for rid in list(live):
        engine.abort(rid)
    end = time.monotonic() + 2.0
    while live and time.monotonic() < end and not engine.dead:
        await asyncio.sleep(0.02)
