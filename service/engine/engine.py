"""The engine: a step loop on its own thread (`schedule -> execute -> update`) and its bridge to asyncio.

Callers on the event loop `open()` a request and iterate its `RequestStream`; the loop thread delivers each
step's outputs with one `call_soon_threadsafe` per step. Leaving the stream by any path (finish, client gone,
error, cancellation) aborts the request, which frees its KV blocks at the start of the next step."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from service.engine.admission import refuse
from service.engine.blocks import BlockManager
from service.engine.burst import DecodeBurst
from service.engine.detokenizer import Decode
from service.engine.outputs import LiveRequest, Outputs
from service.engine.request import (
    EngineConfig,
    EngineSnapshot,
    InvalidRequest,
    ModelOutput,
    Request,
    RequestStats,
    RequestStatus,
    SamplingParams,
    StepStats,
)
from service.engine.runner import ModelRunner
from service.engine.scheduler import Scheduler, SchedulerOutput
from service.engine.stream import Outbox, RequestStream, Sink, drain, run_for

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger("attnserve.engine")

# Re-exported: callers import the engine's public records from here.
__all__ = ["EngineConfig", "InvalidRequest", "RequestStats", "RequestStream", "StepStats"]


class Engine:
    """Continuous batching for one model: requests join the running batch after prefill and leave at once."""

    def __init__(
        self,
        name: str,
        runner: ModelRunner,
        config: EngineConfig,
        decode: Decode,
        eos_id: int | None,
        on_step: Callable[[StepStats], None] | None = None,
        on_finish: Callable[[RequestStats], None] | None = None,
    ) -> None:
        self.name, self.runner, self.config = name, runner, config
        self.decode = decode
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.max_num_seqs,
                                   config.enable_prefix_caching)
        self._prefix_seen = (0, 0)  # the prefix cache's (queries, hits) at the last step's stats
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, eos_id,
                                   config.max_model_len)
        runner.sampler.eos_id = eos_id
        self.burst = DecodeBurst(self.scheduler, runner, config.num_scheduler_steps, config.max_burst_s)
        self.on_step, self.on_finish = on_step, on_finish
        self._inbox: queue.SimpleQueue[tuple[str, Request | str]] = queue.SimpleQueue()
        self.burst.interrupted = lambda: not self._inbox.empty()  # a request, an abort or an inspection waits
        self._wake = threading.Event()
        self._live: dict[str, LiveRequest] = {}
        self._pending = 0  # requests submitted and not yet running (inbox + waiting), for admission control
        self._pending_tokens = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.accepting = True
        self.dead: str | None = None  # why the loop died, if it did
        self.steps = 0  # forward passes (a decode burst's each count)
        self.iterations = 0  # calls of step(): a burst is one
        self.inspections = 0  # teacher-forced attention passes run (engine.capture)
        self._outbox: Sink = Outbox()
        self.overflows = 0  # requests aborted because their reader fell too far behind
        self.outputs = Outputs(name, self.scheduler, runner, self._live, self._outbox, on_finish)
        self._deliver, self._finish = self.outputs.deliver, self.outputs.finish

    # --- the caller's side (event loop thread) -----------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Refuse what can never run or cannot run now, before it is queued."""
        refuse(self, self.config, req, self._pending, self._pending_tokens)

    def open(self, req: Request) -> RequestStream:
        """Queue a request and return its stream (use it as `async with`)."""
        self.check(req)
        stream = RequestStream(self, req, asyncio.get_running_loop(), self.config.max_stream_backlog, self.decode)
        with self._lock:
            self._pending += 1
            self._pending_tokens += req.num_tokens
        self._inbox.put(("add", LiveRequest(req, stream)))  # type: ignore[arg-type]
        self._wake.set()
        return stream

    async def capture(self, encoder_ids: list[int], decoder_ids: list[int],
                      layers: Mapping[str, Iterable[int]]) -> dict[tuple[str, int], Tensor]:
        """Attention weights of one teacher-forced pass (runner.capture), run on the engine's thread between
        steps: queued and counted like a request, refused when the engine is stopped or overloaded, skipped if
        the caller is cancelled before its turn."""
        refuse(self, self.config, None, self._pending, self._pending_tokens)
        with self._lock:
            self._pending += 1
        future: asyncio.Future[dict[tuple[str, int], Tensor]] = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", (lambda: self.runner.capture(encoder_ids, decoder_ids, layers), future)))  # type: ignore[arg-type]
        self._wake.set()
        self.inspections += 1
        return await future

    def abort(self, request_id: str, stopped: bool = False) -> None:
        """Abort a request (`stopped`: its stream found a stop string, it ends as stopped); takes effect at the
        start of the next step (its blocks return then)."""
        self._inbox.put(("stop" if stopped else "abort", request_id))
        self._wake.set()

    def overflowed(self, request_id: str) -> None:
        """A stream's reader fell `max_stream_backlog` outputs behind: its request is aborted (counted)."""
        self.overflows += 1
        self.abort(request_id)

    def snapshot(self, in_loop: bool = False) -> EngineSnapshot:
        """Read from any thread: list lengths and counters are safe to read while the loop runs. `in_loop`: the
        caller is the loop (a core process's main thread), alive unless it died."""
        alive = self.dead is None and (in_loop or (self._thread is not None and self._thread.is_alive()))
        return EngineSnapshot(alive, len(self.scheduler.running), len(self.scheduler.waiting), self.blocks.num_blocks,
                              self.blocks.num_free, self.blocks.num_shared, self.overflows)

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def prefix_caching(self) -> bool:
        return self.blocks.cache is not None

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def warmup(self, prompt_ids: Sequence[int], source_ids: Sequence[int] | None = None, steps: int = 4) -> None:
        """Run a few real steps before the loop starts, so the first user does not pay for lazy init (and, on
        CUDA, capture the decode graphs)."""
        if self.runner.graphs is not None:
            self.runner.graphs.capture_all()
        for n in (1, 2):  # a batch of one and of two: both code paths
            for i in range(n):
                req = Request(f"warmup-{n}-{i}", list(prompt_ids), SamplingParams(max_tokens=steps, temperature=0.0,
                              ignore_eos=True), list(source_ids) if source_ids is not None else None)
                self.admit(LiveRequest(req, None))
            while self.scheduler.has_work():
                self.step()

    async def drain(self, timeout: float) -> None:
        """Stop taking requests; wait up to `timeout` s for the in-flight ones, then abort the rest."""
        await drain(self, self._live, timeout)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the loop (engine thread) ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.runner.bind_thread()
            while not self._stop:
                self._take_inbox()
                self.flush()  # aborts taken above must reach their streams even if no step follows
                if not self.scheduler.has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as e:  # the loop itself failed: fail everyone, report unhealthy
            log.exception("engine loop died")
            self.dead = f"{type(e).__name__}"
            for live in list(self._live.values()):
                self._finish(live, RequestStatus.FINISHED_ERROR, error="the engine stopped unexpectedly")
            self.flush()

    def admit(self, live: LiveRequest) -> None:
        self._live[live.request.request_id] = live
        self.scheduler.add(live.request)

    def abort_now(self, request_id: str, stopped: bool = False) -> None:
        """Abort on the loop's own thread: its blocks return now."""
        live = self._live.get(request_id)
        if live is not None:
            self._finish(live, RequestStatus.FINISHED_STOPPED if stopped else RequestStatus.FINISHED_ABORTED)

    def deliver_to(self, outbox: Sink, on_step: Callable[[StepStats], None],
                   on_finish: Callable[[RequestStats], None]) -> None:
        """Send outputs and stats elsewhere than to streams on event loops (a core process's batches)."""
        self._outbox = self.outputs.outbox = outbox
        self.on_step, self.on_finish = on_step, on_finish
        self.outputs.on_finish = on_finish

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                self._count_pending()
                return
            if kind == "add":
                assert isinstance(item, LiveRequest)
                self.admit(item)
            elif kind == "call":
                self._call(item)  # type: ignore[arg-type]
            else:
                self.abort_now(item, stopped=kind == "stop")  # type: ignore[arg-type]

    def _call(self, job: tuple[Callable[[], Any], asyncio.Future[Any]]) -> None:
        """An inspection pass, between two steps on the engine's thread (the model is never used concurrently)."""
        run_for(*job)

    def _expire(self, now: float) -> None:
        timeout = self.config.queue_timeout
        for live in list(self._live.values()):
            req = live.request
            if req.deadline is not None and now > req.deadline:
                self._finish(live, RequestStatus.FINISHED_ABORTED, error="deadline exceeded")
            elif timeout is not None and req.scheduled_time is None and now - req.arrival_time > timeout:
                self._finish(live, RequestStatus.FINISHED_ABORTED, error=f"waited over {timeout:g} s in the queue")

    def step(self) -> None:
        """One iteration: schedule, execute (one forward, sampled on the device), update, deliver."""
        t0 = time.monotonic()
        self._expire(t0)
        plan = self.scheduler.schedule()
        self._count_pending()
        for s in plan.scheduled:
            if s.request.scheduled_time is None:
                s.request.scheduled_time = t0
        if plan.is_empty:
            self.flush()
            time.sleep(0.001)
            return
        t = time.monotonic()
        decode = plan.num_decode_tokens  # before update() appends this step's tokens
        try:
            output = self.runner.execute(plan.scheduled, plan.copies)
        except Exception:  # a failed forward fails its batch, never the engine
            log.exception("forward failed for %d requests", len(plan.scheduled))
            output = ModelOutput([-1] * len(plan.scheduled), errors=["the model failed on this request"] * len(plan.scheduled))
        forward = time.monotonic() - t
        for rid, scores in output.prompt_logprobs.items():
            if rid in self._live:
                self._live[rid].request.keep_prompt_logprobs(scores)
        for sampled in self.scheduler.update(plan, output):
            self._deliver(sampled, output.attention.get(sampled.request.request_id))
        inner, more = self.burst.extend(plan, t0, lambda sampled: self._deliver(sampled, None))  # engine/burst.py
        self.flush()
        self.steps += 1 + inner
        self.iterations += 1
        if self.on_step is not None:
            self.on_step(self._stats(plan, decode, forward + more, time.monotonic() - t0, 1 + inner))

    def _stats(self, plan: SchedulerOutput, decode: int, forward: float, step_time: float, steps: int = 1
               ) -> StepStats:
        """The step's record; a burst of `steps` decode steps is one record of their sums."""
        prefill = plan.num_tokens - decode
        decode *= steps
        cache = self.blocks.cache
        seen, self._prefix_seen = self._prefix_seen, (cache.queries, cache.hits) if cache else (0, 0)
        return StepStats(self.name, len(plan.scheduled), prefill, decode, forward if prefill else 0.0,
                         forward if not prefill else 0.0, step_time, len(self.scheduler.running),
                         len(self.scheduler.waiting), len(plan.preempted), self.blocks.num_blocks, self.blocks.num_free,
                         self._prefix_seen[0] - seen[0], self._prefix_seen[1] - seen[1], self.blocks.num_shared,
                         steps)

    def _count_pending(self) -> None:
        waiting = self.scheduler.waiting
        with self._lock:
            self._pending = len(waiting) + self._inbox.qsize()
            self._pending_tokens = sum(r.num_tokens for r in waiting)

    def flush(self) -> None:
        self._outbox.flush()
