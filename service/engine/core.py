"""The engine core as its own process's busy loop: requests in, one output batch per step out, over ZMQ.

The loop runs on the process's main thread, the only OpenMP team in the process, with no event loop beside it:
take every waiting message (add, abort, capture), run one step (schedule -> execute -> update), send what the
step produced as one `Batch` (service/engine/wire.py), and block on the sockets only when nothing is running.

A core serves one or more frontends (`--api-server-count`): each has its own pair of sockets, a request's outputs
and its finished stats go back to the frontend that sent it, the step's stats only to the first frontend (whose
metrics hold the engine's histograms once), and every frontend gets the engine's state at least every
`SNAPSHOT_EVERY` seconds. The first frontend's `EngineCoreClient` (client.py) owns the process and restarts or
abandons a core that dies; a core whose server has gone exits by itself."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, cast

import zmq

from service.engine import wire
from service.engine.engine import Engine
from service.engine.outputs import LiveRequest
from service.engine.request import RequestStats, StepOutput, StepStats

log = logging.getLogger("attnserve.core")
IDLE_POLL_MS = 500  # how long an idle core sleeps on its sockets before it checks that its server is alive
SNAPSHOT_EVERY = 0.1  # seconds: a frontend with nothing of its own in the steps still sees the engine's state


class BatchOutbox:
    """The Outbox of a core: a step's outputs, finished requests and stats, sent as one Batch per frontend at
    flush. `owner` maps each open request to the frontend that sent it."""

    def __init__(self, engine: Engine, sends: list[Callable[[bytes], None]]) -> None:
        self.engine, self.sends = engine, sends
        self.owner: dict[str, int] = {}
        self.outputs: list[StepOutput] = []
        self.finished: list[RequestStats] = []
        self.step: StepStats | None = None
        self._last_sent = [0.0] * len(sends)

    def add(self, stream: Any, out: StepOutput) -> None:
        self.outputs.append(out)

    def flush(self) -> None:
        if not (self.outputs or self.finished or self.step):
            return
        snapshot = self.engine.snapshot(in_loop=True)
        if len(self.sends) == 1:
            batches = [wire.Batch(self.outputs, self.finished, self.step, snapshot)]
        else:
            batches = [wire.Batch([], [], self.step if i == 0 else None, snapshot) for i in range(len(self.sends))]
            for out in self.outputs:
                batches[self.owner.get(out.request_id, 0)].outputs.append(out)
            for stats in self.finished:
                batches[self.owner.get(stats.request_id, 0)].finished.append(stats)
        for out in self.outputs:
            if out.finished:
                self.owner.pop(out.request_id, None)
        self.outputs, self.finished, self.step = [], [], None
        now = time.monotonic()
        for i, batch in enumerate(batches):
            if batch.outputs or batch.finished or batch.step or now - self._last_sent[i] >= SNAPSHOT_EVERY:
                self._last_sent[i] = now
                self.sends[i](wire.encode(batch))


class EngineCore:
    """One model's engine driven by messages from each frontend's PULL socket, its outputs sent on PUSH sockets."""

    def __init__(self, engine: Engine, frontends: list[wire.Frontend], grammars: Callable[[], Any] | None = None) -> None:
        self.engine = engine
        self.context = zmq.Context()
        self.inboxes, self.outboxes = [], []
        for to_core, from_core in frontends:
            inbox = self.context.socket(zmq.PULL)
            inbox.connect(to_core)
            outbox = self.context.socket(zmq.PUSH)
            outbox.connect(from_core)
            self.inboxes.append(inbox)
            self.outboxes.append(outbox)
        # the first frontend owns this process: a send to it may wait; another frontend that stopped reading (or
        # died) loses its messages rather than stall the loop
        sends = [self.outboxes[0].send] + [self._sender(s) for s in self.outboxes[1:]]
        self.batches = BatchOutbox(engine, sends)
        engine.deliver_to(self.batches, self._record_step, self._record_finish)
        engine.burst.interrupted = self._waiting  # a burst ends at once for a new request or an abort
        self._grammars_factory, self._grammars = grammars, cast(Any, None)
        self.parent = os.getppid()
        self.ready: wire.Ready | None = None

    @staticmethod
    def _sender(socket: zmq.Socket[bytes]) -> Callable[[bytes], None]:
        def send(frame: bytes) -> None:
            try:
                socket.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("a frontend fell behind: a batch for it was dropped")

        return send

    def _waiting(self) -> bool:
        return any(inbox.poll(0) for inbox in self.inboxes)

    def _record_step(self, stats: StepStats) -> None:
        self.batches.step = stats

    def _record_finish(self, stats: RequestStats) -> None:
        self.batches.finished.append(stats)

    def run(self, ready: wire.Ready) -> None:
        """Say `ready` to every frontend, then the busy loop; returns when the server has gone."""
        self.ready = ready
        for send in self.batches.sends:
            send(wire.encode(ready))
        engine, poller = self.engine, zmq.Poller()
        for inbox in self.inboxes:
            poller.register(inbox, zmq.POLLIN)
        self.engine.runner.bind_thread()
        while True:
            busy = engine.scheduler.has_work()
            events = poller.poll(0 if busy else IDLE_POLL_MS)
            if events:
                for socket, _ in events:
                    self._take_messages(self.inboxes.index(cast(Any, socket)))
            elif not busy and os.getppid() != self.parent:
                return
            engine.flush()  # aborts taken above reach the server even if no step follows
            if engine.scheduler.has_work():
                engine.step()

    def _take_messages(self, frontend: int) -> None:
        for frame in wire.waiting(self.inboxes[frontend]):
            msg = wire.to_core.decode(frame)
            if isinstance(msg, wire.AddRequest):
                self.batches.owner[msg.request_id] = frontend
                self._add(msg)
            elif isinstance(msg, wire.Abort):
                for rid in msg.request_ids:
                    self.engine.abort_now(rid, msg.stopped)
            elif isinstance(msg, wire.Hello):
                for rid in [r for r, f in self.batches.owner.items() if f == frontend]:
                    self.engine.abort_now(rid, False)
                self.batches.sends[frontend](wire.encode(self.ready))
            else:
                self._capture(msg, frontend)

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

    def _capture(self, msg: wire.Capture, frontend: int) -> None:
        send = self.batches.sends[frontend]
        try:
            weights = self.engine.runner.capture(msg.encoder_ids, msg.decoder_ids, msg.layers)
        except Exception as e:
            log.exception("attention capture failed")
            send(wire.encode(wire.Captured(msg.call_id, [], f"{type(e).__name__}: {e}")))
            return
        self.engine.inspections += 1
        records = [wire.Weights(kind, layer, list(w.shape), w.contiguous().numpy().tobytes())
                   for (kind, layer), w in weights.items()]
        send(wire.encode(wire.Captured(msg.call_id, records)))

    def close(self) -> None:
        self.context.destroy(linger=1000)
