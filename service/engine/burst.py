"""Decode bursts: more than one decode step per engine iteration where steps are short.

vLLM's multi-step scheduling (`--num-scheduler-steps`): where a step is short, the work around it (scheduling,
packing the sampler's parameters, the outputs' IPC message, the step's metrics, polling the sockets) costs as
much as the forward itself. Measured on a 3M-parameter model at one stream: the C++ forward was ~52% of the
engine process's time, the rest Python. A burst runs up to `num_scheduler_steps` decode steps back to back for
the same rows, each fed the token the last one sampled, and hands their outputs over as one batch.

A burst only follows a step that was all decode rows, with no request waiting to start, no row asking a step for
more than its next token (logprobs, a grammar's mask, attention rows, prompt scores; the sampler's parameters,
penalties and seeds are honoured as in single steps), and it stops early: at once when a message waits for the
loop (a new request, an abort, an inspection: `interrupted`, which the loop's owner sets), after the budget
(`--max-burst-ms`: a stream's tokens are sent at least that often; a model whose step alone takes longer never
bursts), at the first finished request, or when a row would need a KV block and none is free (no preemption inside
a burst). Each inner step goes through the scheduler's `update()` as a step of its own: the same stops, block
commits and prefix-cache entries as single steps, and the same tokens (tests/service/test_burst.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from service.engine.request import Request, RequestStatus
from service.engine.runner import ModelRunner
from service.engine.scheduler import Sampled, ScheduledRequest, Scheduler, SchedulerOutput


def bursts(req: Request) -> bool:
    """Whether a step asks of a request only its next token: no logprobs, grammar, attention rows or prompt
    scores (temperature, top-k/p, min-p, penalties and seeds are the sampler's, the same in a burst)."""
    return (req.params.logprobs is None and req.matcher is None and req.attention is None
            and req.source_ids is None and req.params.prompt_logprobs is None and req.status == RequestStatus.RUNNING)


class DecodeBurst:
    """Runs the inner steps of a burst after a decode step; `steps` > 1 turns it on."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, steps: int, budget_s: float) -> None:
        """`budget_s`: the engine's `max_burst_s` (--max-burst-ms)."""
        self.scheduler, self.runner, self.steps, self.budget_s = scheduler, runner, steps, budget_s
        self.interrupted: Callable[[], bool] = lambda: False  # whether a message waits for the loop
        self.enabled = steps > 1 and runner.fused is not None and runner.graphs is None
        self.inner = 0  # inner steps run since start (the engine's steps count them too)

    def extend(self, plan: SchedulerOutput, started: float, deliver: Callable[[Sampled], None]) -> tuple[int, float]:
        """After `plan`'s step (begun at `started`) was updated and delivered: run the burst's inner steps.
        Returns (inner steps run, their forward seconds)."""
        reqs = [s.request for s in plan.scheduled]
        if (not self.enabled or not reqs or self.scheduler.waiting or plan.preempted or plan.copies
                or not all(s.num_new == 1 and s.start > 0 and bursts(s.request) for s in plan.scheduled)):
            return 0, 0.0
        done, forward, last = 0, 0.0, None
        per_step = time.monotonic() - started
        while (done + 1 < self.steps and time.monotonic() - started + per_step <= self.budget_s
               and not self.interrupted()):
            step = self._plan(reqs)
            if step is None:
                break
            t = time.monotonic()
            output, last = self.runner.burst_step(step.scheduled, last)
            if output is None:
                output, last = self.runner.execute(step.scheduled), None
            forward += time.monotonic() - t
            done += 1
            ended = False
            for sampled in self.scheduler.update(step, output):
                deliver(sampled)
                ended |= sampled.finished is not None
            per_step = (time.monotonic() - started) / (done + 1)
            if ended:
                break
        self.inner += done
        return done, forward

    def _plan(self, reqs: list[Request]) -> SchedulerOutput | None:
        """The next inner step's plan: each row feeds its last token; None where a row needs a block and none is
        free (the scheduler preempts for it at its next step)."""
        blocks = self.scheduler.blocks
        for req in reqs:
            need = blocks.blocks_for(req.num_computed + 1) - len(blocks.block_ids(req))
            if need > 0:
                if not blocks.can_allocate(need):
                    return None
                blocks.allocate(req, need)
        return SchedulerOutput([ScheduledRequest(r, r.num_computed, 1, blocks.table(r)) for r in reqs])
