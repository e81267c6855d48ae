"""How many threads a CPU step runs on: a rule from the step's size, then, where the rule would split a decode step
over the cores, the step times themselves.

The rule (`rule`): a step runs on one thread where it is short (its ~150 OpenMP regions cost more than the second
core saves) or its outputs come fast (the frontend, whose work grows with them, takes the other core back in the
middle of the step). Over HTTP on 2 cores: the 3M model's one-row bfloat16 step (~0.3 ms) 3,144-3,311 tok/s on one
thread against 2,479-2,528 on two, at 8 rows (~10,000 outputs/s) 8,299-8,430 against 6,079-6,588; the ~11M GPT-2
shape (21 MB of bfloat16 weights) 956 against 1,231 at one row (benchmarks/NOTES.md section 28).

Whether the second core pays also depends on what else runs on the cores: over HTTP at one stream the frontend
and the client share them with the step, and the ~11M shape's one-row step took 0.5-1.3 ms on either count from one
run to the next (benchmarks/NOTES.md section 31). In the core process, where one thread loads the model and steps,
two threads take SmolLM2's one-row int8 step from ~5.3 ms to ~3.9-4.1 ms. (Section 30's "two threads 2x slower"
was measured stepping on a thread other than the one that had loaded the model: two OpenMP teams on two cores,
whose workers libgomp then puts to sleep at every hand-over, section 10.)
So where the rule says "all threads" for a decode step, `ThreadChoice` measures: it keeps the rule's count, at the
FIRST_PROBE-th and every PERIOD-th step of a size runs PROBE steps on the other count, and keeps whichever had the
lower median step time, the probe's steps against the kept count's recent ones (a probe's first step, which pays
the switch, is not counted; the other count must be 5% faster). A probe on the slower count costs PROBE / PERIOD of
the steps up to twice their time: at most ~1.6%."""

from __future__ import annotations

import logging
import statistics
from collections import deque

log = logging.getLogger("attnserve.runner")

# A CPU step is split over the cores where one core would take >= SPLIT_FROM_S and its outputs come at most
# SPLIT_TO_PER_S; one core's time from the weights read and the products computed at one core's rates on our
# kernels as measured in the server (SmolLM2's 268 MB bfloat16 one-row step in ~13 ms: ~20 GB/s; the 3M model's
# 32-row bfloat16 step, ~200 MFLOP, in ~2-3 ms: ~100 GFLOP/s; float32's products half as fast).
SPLIT_FROM_S, SPLIT_TO_PER_S = 0.8e-3, 6000.0
ONE_CORE_BYTES_PER_S, ONE_CORE_FLOPS, ONE_CORE_FLOPS_FLOAT32 = 20e9, 100e9, 50e9
# The first probe comes once the kept count's window holds warm steps: a server's first request's first steps took
# 1.3-1.9 ms for the ~11M shape against ~0.6 after, which had decided the count at the 8th step.
FIRST_PROBE, PERIOD, PROBE, WINDOW = 32, 256, 4, 9  # steps
SWITCH_BELOW = 0.95  # the other count's median step time, as a fraction of the kept count's, that switches


def rule(max_threads: int, weight_bytes: float, flops_per_token: float, flops_per_s: float, num_rows: int,
         num_seqs: int) -> int:
    """The thread count from the step's estimated time on one core and its outputs' rate."""
    one_core = weight_bytes / ONE_CORE_BYTES_PER_S + num_rows * flops_per_token / flops_per_s
    return max_threads if one_core >= SPLIT_FROM_S and num_seqs / one_core <= SPLIT_TO_PER_S else 1


class ThreadChoice:
    """For one size of step (its rows, rounded up to a power of two): all threads or one, by measurement."""

    def __init__(self, max_threads: int) -> None:
        self.kept, self.other = max_threads, 1
        self.times: dict[int, deque[float]] = {max_threads: deque(maxlen=WINDOW), 1: deque(maxlen=WINDOW)}
        self.steps, self.probing, self.current = 0, 0, max_threads
        self.switches = 0

    def next(self) -> int:
        """The thread count of the next step of this size."""
        self.steps += 1
        if self.probing == 0 and (self.steps == FIRST_PROBE or self.steps % PERIOD == 0):
            self.probing = PROBE
            self.times[self.other].clear()  # the other count is judged by this probe alone
        self.current = self.other if self.probing else self.kept
        return self.current

    def record(self, seconds: float) -> None:
        """The step's time on `current` threads; at a probe's end, keep the faster count."""
        if self.probing:
            self.probing -= 1
            if self.probing < PROBE - 1:  # the probe's first step paid for the switch
                self.times[self.other].append(seconds)
            if self.probing == 0:
                self._decide()
        else:
            self.times[self.kept].append(seconds)

    def _decide(self) -> None:
        kept, other = self.times[self.kept], self.times[self.other]
        if kept and other and statistics.median(other) < SWITCH_BELOW * statistics.median(kept):
            log.info("step threads", extra={"threads": self.other, "instead_of": self.kept, "median_ms": round(
                1e3 * statistics.median(other), 3), "kept_median_ms": round(1e3 * statistics.median(kept), 3)})
            self.kept, self.other = self.other, self.kept
            self.switches += 1


class Threads:
    """The runner's thread count per step (`choose`, then `record` its time)."""

    def __init__(self, max_threads: int, weight_bytes: float, flops_per_token: float, flops_per_s: float) -> None:
        self.max_threads, self.weight_bytes = max_threads, weight_bytes
        self.flops_per_token, self.flops_per_s = flops_per_token, flops_per_s
        self.choices: dict[int, ThreadChoice] = {}
        self._measured: ThreadChoice | None = None  # the choice the last step's count came from, if measured

    def choose(self, num_rows: int, num_seqs: int, decode_only: bool) -> int:
        want = rule(self.max_threads, self.weight_bytes, self.flops_per_token, self.flops_per_s, num_rows, num_seqs)
        self._measured = None
        if want == 1 or not decode_only:
            return want
        size = 1 << (num_rows - 1).bit_length()
        choice = self._measured = self.choices.setdefault(size, ThreadChoice(self.max_threads))
        return choice.next()

    def record(self, seconds: float) -> None:
        if self._measured is not None:
            self._measured.record(seconds)
            self._measured = None
