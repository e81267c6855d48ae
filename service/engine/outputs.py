"""A request's outputs on the engine's side: each sampled token, the end (finish reason, timings, stats), and
their hand-off to the request's stream. Text (detokenization, stop strings) is the stream's work, on the
server's side (stream.py): the core only counts tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.engine.request import PromptLogprob, Request, RequestStats, RequestStatus, StepOutput
from service.engine.runner import ModelRunner
from service.engine.scheduler import Sampled, Scheduler
from service.engine.stream import Sink


@dataclass
class LiveRequest:
    """Engine-side state of a request: its record and where its outputs go."""

    request: Request
    stream: Any  # where its outputs go: a RequestStream, True in a core process (its batches), None: nowhere
    itls: list[float] = field(default_factory=list)
    prompt_logprobs_sent: bool = False


def queue_time(req: Request) -> float | None:
    return None if req.scheduled_time is None else req.scheduled_time - req.arrival_time


class Outputs:
    """Turns the scheduler's view of each row into the StepOutputs a request's stream receives."""

    def __init__(self, name: str, scheduler: Scheduler, runner: ModelRunner, live: dict[str, LiveRequest], outbox: Sink,
                 on_finish: Callable[[RequestStats], None] | None) -> None:
        self.name, self.scheduler, self.runner, self.live = name, scheduler, runner, live
        self.outbox, self.on_finish = outbox, on_finish

    def emit(self, live: LiveRequest, out: StepOutput) -> None:
        if live.stream is not None:
            self.outbox.add(live.stream, out)

    def first_prompt_logprobs(self, live: LiveRequest) -> tuple[PromptLogprob | None, ...] | None:
        """The prompt's log-probs, on the request's first output only."""
        req = live.request
        if live.prompt_logprobs_sent or req.params.prompt_logprobs is None:
            return None
        live.prompt_logprobs_sent = True
        return tuple(req.prompt_logprobs or [None] * len(req.prompt_ids))

    def deliver(self, sampled: Sampled, attention: dict[str, Any] | None) -> None:
        """Turn what the scheduler's update made of a row into the request's output (text, stop strings, end)."""
        req = sampled.request
        live = self.live.get(req.request_id)
        if live is None:
            return
        if sampled.token is None:  # it ended without a new token: an error (a stop token is its last token)
            self.finish(live, sampled.finished or RequestStatus.FINISHED_ERROR, error=sampled.error)
            return
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
        elif req.last_token_time is not None:
            live.itls.append(now - req.last_token_time)
        req.last_token_time = now
        status = sampled.finished
        self.emit(live, StepOutput(req.request_id, sampled.token, "", sampled.logprob, sampled.top_logprobs,
                                    num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_ids),
                                    queue_time=queue_time(req), ttft=req.first_token_time - req.arrival_time,
                                    attention=attention, prompt_logprobs=self.first_prompt_logprobs(live),
                                    stop_token=sampled.stop_token))
        if status is not None:
            self.finish(live, status)

    def finish(self, live: LiveRequest, status: RequestStatus, error: str | None = None) -> None:
        req = live.request
        if req.status.is_finished and req.request_id not in self.live:
            return
        self.scheduler.finish(req, status)
        self.runner.release(req.request_id)
        self.live.pop(req.request_id, None)
        req.finish_time = time.monotonic()
        req.error = error
        reason = status.finish_reason or "error"
        e2e = req.finish_time - req.arrival_time
        ttft = None if req.first_token_time is None else req.first_token_time - req.arrival_time
        self.emit(live, StepOutput(req.request_id, None, "", finished=True, finish_reason=reason, error=error,
                                    num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_ids),
                                    queue_time=queue_time(req), ttft=ttft, e2e=e2e,
                                    prompt_logprobs=self.first_prompt_logprobs(live)))
        if self.on_finish is not None and req.counted and not req.request_id.startswith("warmup-"):
            self.on_finish(RequestStats(self.name, req.request_id, reason, req.num_prompt_tokens, len(req.output_ids),
                                        queue_time(req), ttft, e2e, tuple(live.itls)))

