"""A stream's slow-reader rule (service/engine/stream.py): a reader that fell --max-stream-backlog outputs behind is
cut off, but a reader waiting on the stream is never behind, however many hand-overs a busy event loop runs before
it wakes (the loop's lag is not the reader's)."""

from __future__ import annotations

import asyncio

from service.engine.request import Request, SamplingParams, StepOutput
from service.engine.stream import RequestStream, deliver


class Engine:
    """What a stream calls back: the aborts and overflows it asks for, recorded."""

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.overflows: list[str] = []

    def abort(self, request_id: str, stopped: bool = False) -> None:
        self.aborted.append(request_id)

    def overflowed(self, request_id: str) -> None:
        self.overflows.append(request_id)


def token(i: int, finished: bool = False) -> StepOutput:
    return StepOutput("r", i, "", finished=finished, finish_reason="length" if finished else None)


async def hand_overs(reader_starts: bool, n: int) -> tuple[list[StepOutput], Engine]:
    """n hand-overs of one output each, run back to back on the loop (a busy loop: the reader gets no turn
    between them), then the last output; the reader either waits on the stream from the start or starts later."""
    engine = Engine()
    stream = RequestStream(engine, Request("r", [1, 2], SamplingParams(max_tokens=n + 1)), asyncio.get_running_loop(),
                           backlog=4)

    async def read() -> list[StepOutput]:
        return [o async for o in stream]

    reader = asyncio.create_task(read())
    if reader_starts:
        await asyncio.sleep(0)  # the reader runs once and waits on the empty stream
    for i in range(n):
        deliver([(stream, token(i))])
    deliver([(stream, token(n, finished=True))])
    return await reader, engine


def test_a_waiting_reader_behind_a_busy_loop_is_not_cut_off() -> None:
    outs, engine = asyncio.run(hand_overs(reader_starts=True, n=12))
    assert [o.token_id for o in outs] == list(range(13)) and outs[-1].finish_reason == "length"
    assert engine.overflows == []


def test_a_reader_that_does_not_take_its_outputs_is_cut_off_at_the_backlog() -> None:
    outs, engine = asyncio.run(hand_overs(reader_starts=False, n=12))
    assert engine.overflows == ["r"]
    assert [o.token_id for o in outs[:-1]] == [0, 1, 2, 3]  # 4 waiting when the 5th came: the 5th ends it
    assert outs[-1].error_code == "slow_reader" and outs[-1].finish_reason == "error"
