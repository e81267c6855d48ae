"""The records between the server process and an engine core process, as typed msgpack (msgspec) over ZMQ.

Client -> core: `AddRequest`, `Abort`, `Capture`, `Hello`. Core -> client: `Ready` once, then one `Batch` per step that
produced anything (the step's outputs, the requests finished, the step's stats and the engine's state after it),
and a `Captured` for each capture. Records are typed at both ends: a decoder refuses what does not match."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import zmq

from service.engine.request import (
    AttentionSpec,
    EngineConfig,
    EngineSnapshot,
    Request,
    RequestStats,
    SamplingParams,
    StepOutput,
    StepStats,
)


class AddRequest(msgspec.Struct, tag=True):
    """A request as the core needs it: what to run and how; its state in the core is the core's own."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    source_ids: list[int] | None
    arrival_time: float  # time.monotonic(): one clock for every process on the machine
    deadline: float | None
    attention: AttentionSpec | None
    counted: bool

    @classmethod
    def of(cls, req: Request) -> AddRequest:
        return cls(req.request_id, req.prompt_ids, req.params, req.source_ids, req.arrival_time, req.deadline,
                   req.attention, req.counted)

    def request(self) -> Request:
        return Request(self.request_id, list(self.prompt_ids), self.params, self.source_ids, self.arrival_time,
                       self.deadline, attention=self.attention, counted=self.counted)


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]
    stopped: bool = False  # the server found a stop string: the requests end as stopped


class Capture(msgspec.Struct, tag=True):
    """A teacher-forced attention pass (runner.capture), run by the core between two steps."""

    call_id: int
    encoder_ids: list[int]
    decoder_ids: list[int]
    layers: dict[str, list[int]]


class Hello(msgspec.Struct, tag=True):
    """A frontend that attached to a running core (service/engine/attached.py): the core answers with its `Ready`,
    and aborts whatever an earlier process in that frontend's place had left running."""


class Ready(msgspec.Struct, tag=True):
    """The core has loaded and warmed its model and runs its loop: what it serves, as it chose it."""

    config: EngineConfig
    device: str
    dtype: str  # "float32", "bfloat16", ...
    parameters: int
    pid: int = 0  # the core process's, which a frontend that does not own it watches


class Batch(msgspec.Struct, tag=True):
    outputs: list[StepOutput]
    finished: list[RequestStats]
    step: StepStats | None
    snapshot: EngineSnapshot


class Weights(msgspec.Struct):
    """One captured (kind, layer) attention tensor: float32, C order."""

    kind: str
    layer: int
    shape: list[int]
    data: bytes


class Captured(msgspec.Struct, tag=True):
    call_id: int
    weights: list[Weights]
    error: str | None = None

    def result(self) -> Any:
        """The captured weights per (kind, layer) as float32 tensors, or the error the capture raised."""
        if self.error is not None:
            return RuntimeError(self.error)
        import torch

        return {(w.kind, w.layer): torch.frombuffer(bytearray(w.data), dtype=torch.float32).reshape(w.shape)
                for w in self.weights}


Frontend = tuple[str, str]  # the addresses of one frontend's sockets: (to the core, from the core)
ToCore = AddRequest | Abort | Capture | Hello
FromCore = Ready | Batch | Captured

encoder = msgspec.msgpack.Encoder()
to_core = msgspec.msgpack.Decoder(ToCore)
from_core = msgspec.msgpack.Decoder(FromCore)


def encode(record: Any) -> bytes:
    return encoder.encode(record)


def waiting(socket: zmq.Socket[bytes]) -> Iterator[bytes]:
    """The frames a socket holds now, without waiting for more."""
    while True:
        try:
            yield socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
