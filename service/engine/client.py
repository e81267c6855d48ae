"""The server's side of an engine core process (core.py): the same interface as the in-process `Engine`.

`open()` sends the request to the core and returns its `RequestStream`; a reader thread receives the core's
step batches, hands each loop its streams' outputs with one `call_soon_threadsafe` per batch, and feeds the
metrics from the batch's stats. The reader also watches the process: when it dies, every in-flight stream ends
at once with an `engine_dead` error, `dead` says why (so /ready is false), and the core is started again, or
`on_fatal` is called (the server exits), as `restart` says."""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import zmq

from service.engine import wire
from service.engine.admission import refuse
from service.engine.detokenizer import Decode
from service.engine.request import (
    EngineConfig,
    EngineDead,
    EngineSnapshot,
    Request,
    RequestStats,
    StepOutput,
    StepStats,
)
from service.engine.stream import RequestStream, drain, hand_over, settle

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger("attnserve.engine")
Frontend = wire.Frontend
Spawn = Callable[[list[Frontend]], BaseProcess]  # every frontend's addresses -> the started core process


class CoreStartError(RuntimeError):
    """The core process died or timed out while loading its model."""


class EngineCoreClient:
    """One model's engine core in its own process, seen from the server process."""

    def __init__(self, name: str, spawn: Spawn | None, restart: bool = True, backlog: int = 1024,
                 on_step: Callable[[StepStats], None] | None = None,
                 on_finish: Callable[[RequestStats], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None, frontends: int = 1,
                 address: Frontend | None = None) -> None:
        """`frontends`: how many servers share the core (--api-server-count); this client is the first, and
        `frontends` lists every one's addresses for the others (service/frontends.py). `address`: this client's
        sockets, where another client owns the core (service/engine/attached.py)."""
        self.name, self.spawn, self.restart, self.backlog = name, spawn, restart, backlog
        self.on_step, self.on_finish, self.on_fatal = on_step, on_finish, on_fatal
        self.decode: Decode | None = None  # the tokenizer's, for the streams' text (set once it is read)
        self.config = EngineConfig()
        self.dead: str | None = None
        self.accepting = True
        self.steps = self.inspections = self.overflows = self.restarts = 0
        self._streams: dict[str, RequestStream] = {}
        self._sent: dict[str, int] = {}  # output tokens each open request has received
        self._waiting: dict[str, int] = {}  # requests with no output yet -> their tokens (admission control)
        self._captures: dict[int, asyncio.Future[dict[tuple[str, int], Tensor]]] = {}
        self._call_ids = itertools.count()
        self._snapshot: EngineSnapshot | None = None
        self._dir = tempfile.mkdtemp(prefix="attnserve-core-") if address is None else ""
        self.frontends: list[Frontend] = [address] if address is not None else [
            (f"ipc://{self._dir}/in{i}", f"ipc://{self._dir}/out{i}") for i in range(frontends)]
        self.to_core, self.from_core = self.frontends[0]
        self._context = zmq.Context()
        self._out = self._context.socket(zmq.PUSH)
        self._out.bind(self.to_core)
        self._in = self._context.socket(zmq.PULL)
        self._in.bind(self.from_core)
        self._send_lock = threading.Lock()
        self._proc: BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._closing = False
        atexit.register(self._exiting)  # before multiprocessing's own handler ends the core: no restart then

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def launch(self) -> None:
        """Start the core process (it loads and warms its model; `wait_ready` waits for that)."""
        assert self.spawn is not None
        self._proc = self.spawn(self.frontends)

    def wait_ready(self, timeout: float = 900.0) -> wire.Ready:
        assert self._proc is not None
        poller = zmq.Poller()
        poller.register(self._in, zmq.POLLIN)
        poller.register(self._proc.sentinel, zmq.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            raise CoreStartError(f"the engine process for {self.name} was not ready after {timeout:g} s")
        if not self._in.poll(0):
            self._proc.join(5)
            raise CoreStartError(f"the engine process for {self.name} exited while loading its model "
                                 f"(exit code {self._proc.exitcode}); its log says why")
        msg = wire.from_core.decode(self._in.recv())
        assert isinstance(msg, wire.Ready), msg
        self.config = msg.config
        return msg

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name=f"core-client-{self.name}", daemon=True)
        self._reader.start()

    def warmup(self, *args: Any, **kwargs: Any) -> None:
        """The core warms its model up before it says it is ready."""

    async def drain(self, timeout: float) -> None:
        self.restart = False  # the server is stopping: a core that dies now is not started again
        await drain(self, self._streams, timeout)

    def stop(self) -> None:
        self._closing = True
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()  # it ignores SIGTERM (sent to a whole process group, it would race the drain)
            self._proc.join(10)
        if self._reader is not None:
            self._reader.join(5)
        self._context.destroy(linger=0)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _exiting(self) -> None:
        self._closing = True

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # --- the caller's side (event loop threads) ----------------------------------------------------------------

    def check(self, req: Request) -> None:
        refuse(self, self.config, req, len(self._waiting), sum(self._waiting.values()))

    def open(self, req: Request) -> RequestStream:
        self.check(req)
        stream = RequestStream(self, req, asyncio.get_running_loop(), self.backlog, self.decode)
        rid = req.request_id
        self._streams[rid], self._sent[rid], self._waiting[rid] = stream, 0, req.num_tokens
        self._post(wire.AddRequest.of(req))
        return stream

    def abort(self, request_id: str, stopped: bool = False) -> None:
        self._post(wire.Abort([request_id], stopped))

    def overflowed(self, request_id: str) -> None:
        self.overflows += 1
        self.abort(request_id)

    async def capture(self, encoder_ids: list[int], decoder_ids: list[int],
                      layers: Mapping[str, Iterable[int]]) -> dict[tuple[str, int], Tensor]:
        refuse(self, self.config, None, len(self._waiting), 0)
        call_id = next(self._call_ids)
        future = self._captures[call_id] = asyncio.get_running_loop().create_future()
        self._post(wire.Capture(call_id, list(encoder_ids), list(decoder_ids), {k: list(v) for k, v in layers.items()}))
        self.inspections += 1
        try:
            return await future
        finally:
            self._captures.pop(call_id, None)

    def snapshot(self) -> EngineSnapshot:
        s = self._snapshot or EngineSnapshot(False, 0, 0, self.config.num_blocks, self.config.num_blocks)
        return EngineSnapshot(self.dead is None and self._alive(), s.num_running,
                              s.num_waiting, s.blocks_total, s.blocks_free, s.blocks_shared, self.overflows,
                              self.restarts)

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def prefix_caching(self) -> bool:
        return self.config.enable_prefix_caching

    def _post(self, record: Any) -> None:
        with self._send_lock:
            self._out.send(wire.encode(record))

    # --- the reader thread -------------------------------------------------------------------------------------

    def _read(self) -> None:
        while not self._closing:
            poller = zmq.Poller()
            poller.register(self._in, zmq.POLLIN)
            poller.register(self._watched(), zmq.POLLIN)
            while not self._closing:
                events = dict(poller.poll(200))
                if self._in in events:
                    self._take()
                elif events and not self._closing:  # the process ended (its last batches were taken above)
                    self._died(self._ended())
                    break
            if self._closing or not self._recover():
                return

    def _watched(self) -> int:
        """A file descriptor that becomes readable when the core process ends."""
        assert self._proc is not None
        return self._proc.sentinel

    def _ended(self) -> str:
        assert self._proc is not None
        self._proc.join(1)
        return f"the engine process exited with code {self._proc.exitcode}"

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _take(self) -> None:
        for frame in wire.waiting(self._in):
            msg = wire.from_core.decode(frame)
            if isinstance(msg, wire.Batch):
                self._dispatch(msg)
            elif isinstance(msg, wire.Captured):
                self._settle(msg)

    def _dispatch(self, batch: wire.Batch) -> None:
        items: list[tuple[RequestStream, StepOutput]] = []
        for out in batch.outputs:
            rid = out.request_id
            stream = self._streams.get(rid)
            if stream is None:
                continue
            self._waiting.pop(rid, None)
            self._sent[rid] = out.num_output_tokens
            if out.finished:
                del self._streams[rid]
                self._sent.pop(rid, None)
            items.append((stream, out))
        hand_over(items)
        if self.on_finish is not None:
            for stats in batch.finished:
                self.on_finish(stats)
        if batch.step is not None:
            self.steps += batch.step.steps  # forward passes: a decode burst's each count
            if self.on_step is not None:
                self.on_step(batch.step)
        self._snapshot = batch.snapshot

    def _settle(self, msg: wire.Captured) -> None:
        future = self._captures.get(msg.call_id)
        if future is not None:
            settle(future, msg.result())

    def _died(self, reason: str) -> None:
        """End every in-flight request now with an error; the metrics count each once, as finished in error."""
        self.dead = reason
        log.error("engine process died", extra={"model": self.name, "reason": reason})
        message = f"the engine for {self.name} stopped ({reason}); retry the request"
        items = []
        for rid, stream in list(self._streams.items()):
            req = stream.request
            out_tokens = self._sent.get(rid, 0)
            items.append((stream, StepOutput(rid, None, "", finished=True, finish_reason="error", error=message,
                                             error_code="engine_dead", num_prompt_tokens=req.num_prompt_tokens,
                                             num_output_tokens=out_tokens)))
            if self.on_finish is not None and req.counted:
                self.on_finish(RequestStats(self.name, rid, "error", req.num_prompt_tokens, out_tokens, None, None, 0.0))
        self._streams.clear()
        self._sent.clear()
        self._waiting.clear()
        hand_over(items)
        for future in list(self._captures.values()):
            settle(future, EngineDead(message))
        self._snapshot = None

    def _recover(self) -> bool:
        """Start a new core (restart) or hand the failure to `on_fatal`; True when a new core is running."""
        if not self.restart:
            if self.on_fatal is not None:
                self.on_fatal(self.dead or "the engine process died")
            return False
        try:
            self.launch()
            self.wait_ready()
        except CoreStartError as e:
            log.error("engine process restart failed", extra={"model": self.name, "reason": str(e)})
            if self.on_fatal is not None:
                self.on_fatal(str(e))
            return False
        self.restarts += 1
        self.dead = None
        log.warning("engine process restarted", extra={"model": self.name, "pid": self.pid, "restarts": self.restarts})
        return True
