"""The engine core as its own process's busy loop: requests in, one output batch per step out, over ZMQ.

The loop runs on the process's main thread, the only OpenMP team in the process, with no event loop beside it:
take every waiting message (add, abort, capture), run one step (schedule -> execute -> update), send what the
step produced as one `Batch` (service/engine/wire.py), and block on the socket only when nothing is running.
The server's `EngineCoreClient` (client.py) owns the sockets' addresses and restarts or abandons a core that
dies; a core whose server has gone exits by itself."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, cast

import zmq

from service.engine import wire
from service.engine.engine import Engine
from service.engine.outputs import LiveRequest
from service.engine.request import RequestStats, StepOutput, StepStats

log = logging.getLogger("attnserve.core")
IDLE_POLL_MS = 500  # how long an idle core sleeps on its socket before it checks that its server is alive


class BatchOutbox:
    """The Outbox of a core: a step's outputs, finished requests and stats, sent as one Batch at flush."""

    def __init__(self, engine: Engine, send: Callable[[bytes], None]) -> None:
        self.engine, self.send = engine, send
        self.outputs: list[StepOutput] = []
        self.finished: list[RequestStats] = []
        self.step: StepStats | None = None

    def add(self, stream: Any, out: StepOutput) -> None:
        self.outputs.append(out)

    def flush(self) -> None:
        if not (self.outputs or self.finished or self.step):
            return
        batch = wire.Batch(self.outputs, self.finished, self.step, self.engine.snapshot(in_loop=True))
        self.outputs, self.finished, self.step = [], [], None
        self.send(wire.encode(batch))


class EngineCore:
    """One model's engine driven by messages from a ZMQ PULL socket, its outputs sent on a PUSH socket."""

    def __init__(self, engine: Engine, to_core: str, from_core: str, grammars: Callable[[], Any] | None = None) -> None:
        self.engine = engine
        self.context = zmq.Context()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.connect(to_core)
        self.outbox = self.context.socket(zmq.PUSH)
        self.outbox.connect(from_core)
        self.batches = BatchOutbox(engine, self.outbox.send)
        engine.deliver_to(self.batches, self._record_step, self._record_finish)
        self._grammars_factory, self._grammars = grammars, cast(Any, None)
        self.parent = os.getppid()

    def _record_step(self, stats: StepStats) -> None:
        self.batches.step = stats

    def _record_finish(self, stats: RequestStats) -> None:
        self.batches.finished.append(stats)

    def run(self, ready: wire.Ready) -> None:
        """Say `ready`, then the busy loop; returns when the server has gone."""
        self.outbox.send(wire.encode(ready))
        engine, poller = self.engine, zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        self.engine.runner.bind_thread()
        while True:
            busy = engine.scheduler.has_work()
            if poller.poll(0 if busy else IDLE_POLL_MS):
                self._take_messages()
            elif not busy and os.getppid() != self.parent:
                return
            engine.flush()  # aborts taken above reach the server even if no step follows
            if engine.scheduler.has_work():
                engine.step()

    def _take_messages(self) -> None:
        for frame in wire.waiting(self.inbox):
            msg = wire.to_core.decode(frame)
            if isinstance(msg, wire.AddRequest):
                self._add(msg)
            elif isinstance(msg, wire.Abort):
                for rid in msg.request_ids:
                    self.engine.abort_now(rid, msg.stopped)
            else:
                self._capture(msg)

    def _add(self, msg: wire.AddRequest) -> None:
        req = msg.request()
        constraint = req.params.constraint
        if constraint is not None:  # compiled (and checked) by the server already: compiled here again, cached
            from service.engine.structured import matcher

            req.matcher = matcher(self._compile(constraint), self.engine.runner.sampler.eos_id is not None)
        self.engine.admit(LiveRequest(req, True))

    def _compile(self, constraint: Any) -> Any:
        if self._grammars is None:
            assert self._grammars_factory is not None, "a constrained request reached a core without a tokenizer"
            self._grammars = self._grammars_factory()
        return self._grammars.cached(constraint)

    def _capture(self, msg: wire.Capture) -> None:
        try:
            weights = self.engine.runner.capture(msg.encoder_ids, msg.decoder_ids, msg.layers)
        except Exception as e:
            log.exception("attention capture failed")
            self.outbox.send(wire.encode(wire.Captured(msg.call_id, [], f"{type(e).__name__}: {e}")))
            return
        self.engine.inspections += 1
        records = [wire.Weights(kind, layer, list(w.shape), w.contiguous().numpy().tobytes())
                   for (kind, layer), w in weights.items()]
        self.outbox.send(wire.encode(wire.Captured(msg.call_id, records)))

    def close(self) -> None:
        self.context.destroy(linger=1000)
