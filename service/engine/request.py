"""Plain records that cross the engine's boundaries: sampling parameters, requests, their status, step outputs."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.IntEnum):
    """Ordered: everything at or above FINISHED_STOPPED is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


@dataclass(frozen=True)
class Constraint:
    """What the output must match (structured output): a JSON schema, any JSON object, a regex, one of some
    strings, or an EBNF (GBNF) grammar. `spec` is the schema's JSON text, the regex, the grammar, or the choices
    as a JSON list; compiled per model and held by a request as a matcher (service/engine/structured.py)."""

    kind: str  # "json" | "json_object" | "regex" | "choice" | "grammar"
    spec: str = ""
    any_whitespace: bool = False  # JSON: free whitespace between tokens (off: compact JSON, which small models end)


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop. temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens whose probability is below min_p times the most likely one's
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives to report; 0 = only the chosen token's logprob
    min_tokens: int = 0  # EOS and stop_token_ids are not sampled before this many output tokens
    prompt_logprobs: int | None = None  # score the prompt: each token's log-prob (+ top-N); None = not computed
    include_stop_str_in_output: bool = False
    constraint: Constraint | None = None  # the output is held to it; it ends the output (min_tokens gives way)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class AttentionSpec:
    """Attention rows to return with each generated token: the row of the query that produced it."""

    kinds: tuple[str, ...] = ("decoder_self",)  # and/or "cross" for a translator
    layers: tuple[int, ...] | None = None  # None: every decoder layer
    heads: tuple[int, ...] | None = None  # None: every head
    aggregation: str = "mean"  # "none" keeps the heads; "mean" / "max" over them


@dataclass(eq=False)  # identity: the queues test membership by object, never by comparing every field
class Request:
    """One generation request: what to generate (ids, parameters, limits) and how far it has got.

    Decoder tokens are `prompt_ids + output_ids`; `num_computed` of them have K/V in the cache. A translator's
    request also has `source_ids` for the encoder. What it holds in the KV pool while it runs (its block table,
    its slot, its encoder K/V's budget, its blocks' prefix-cache names) is the block manager's, kept per request
    id (`BlockTable`, service/engine/blocks.py)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    source_ids: list[int] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time after which the request is aborted
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_preemptions: int = 0
    scheduled_time: float | None = None  # first time it left the waiting queue
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None
    attention: AttentionSpec | None = None  # stream attention rows with each token (the explicit path)
    prompt_logprobs: list[PromptLogprob | None] | None = None  # filled during prefill when params ask
    matcher: Any = None  # params.constraint's state over the output so far (xgrammar's GrammarMatcher)
    counted: bool = True  # False: one step of a search run for a user's request, which that request reports once

    def keep_prompt_logprobs(self, scores: dict[int, PromptLogprob]) -> None:
        """Prompt positions scored in one step (a long prompt is scored chunk by chunk, a recompute again)."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_ids)
        for position, lp in scores.items():
            self.prompt_logprobs[position] = lp

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.source_ids is not None

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens the caller sent: a translator's prompt is its source (its decoder prompt is only BOS). The one
        count that usage, metrics and logs all report."""
        return len(self.source_ids if self.source_ids is not None else self.prompt_ids)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class PromptLogprob:
    """A prompt token's log-prob given the tokens before it, and the top alternatives at that position."""

    token_id: int
    logprob: float
    top_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ModelOutput:
    """What the runner returns for one step, one entry per scheduled request, in the plan's order (already on
    the host: one transfer). token_ids[i] is -1 where the request sampled nothing (a prefill chunk that does
    not reach its last token) or where errors[i] says why its logits were unusable."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[tuple[TokenLogprob, ...]] | None = None
    errors: list[str | None] | None = None
    attention: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> this step's rows
    prompt_logprobs: dict[str, dict[int, PromptLogprob]] = field(default_factory=dict)  # id -> position -> it


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one request: a token and its text delta, or the end."""

    request_id: str
    token_id: int | None
    text: str  # new text since the previous output (may be "" while a UTF-8 character or stop string is pending)
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None  # "engine_dead": the engine process died; "slow_reader": the stream overflowed
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first scheduling
    ttft: float | None = None  # seconds from arrival to the first token
    e2e: float | None = None  # seconds from arrival to the end (final output only)
    attention: dict[str, Any] | None = None  # {"query_position": p, kind: (layers, heads, T_k) nested lists}
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None  # on the first output only; entry 0 is None
    stop_token: bool = False  # token_id is the EOS or stop token id that ended the output: it has no text


class EngineError(Exception):
    """Base of the errors the engine reports to callers; the HTTP layer maps each subclass to a status."""


class RequestTooLong(EngineError):
    """The prompt (or prompt + max_tokens) does not fit the model's context or the KV pool."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; retry later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(EngineError):
    """The engine is draining or stopped and takes no new requests."""


class EngineDead(EngineError):
    """The engine loop died; the process should be restarted."""


class InvalidRequest(EngineError):
    """A request the model cannot run whatever the load (e.g. an empty source for a translator)."""


@dataclass(frozen=True)
class EngineConfig:
    num_blocks: int = 1024  # the KV budget in blocks (admission and preemption decide by it)
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int = 512  # beyond this, new requests are refused (HTTP 429)
    max_waiting_tokens: int = 262144
    queue_timeout: float | None = None  # seconds a request may wait before it starts
    max_model_len: int = 512
    enable_prefix_caching: bool = True  # reuse computed blocks of a known prefix (vLLM's automatic prefix caching)
    max_stream_backlog: int = 1024  # outputs a stream's reader may fall behind before its request is aborted
    num_scheduler_steps: int = 1  # decode steps per iteration at most, where they are short (engine/burst.py)
    max_burst_s: float = 0.016  # the longest an iteration's decode burst runs before its tokens are sent


@dataclass(frozen=True)
class StepStats:
    """One engine step, for metrics."""

    model: str
    batch_size: int
    num_prefill_tokens: int
    num_decode_tokens: int
    prefill_time: float
    decode_time: float
    step_time: float
    num_running: int
    num_waiting: int
    num_preempted: int
    blocks_total: int
    blocks_free: int
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache this step
    prefix_hits: int = 0  # of which were found computed
    blocks_shared: int = 0
    steps: int = 1  # forward passes this record stands for (a decode burst: its sums; engine/burst.py)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state at one moment, for metrics scraped between steps."""

    up: bool
    num_running: int
    num_waiting: int
    blocks_total: int
    blocks_free: int
    blocks_shared: int = 0
    streams_overflowed: int = 0  # requests aborted because their reader fell too far behind
    restarts: int = 0  # engine core processes started again after one died


@dataclass(frozen=True)
class RequestStats:
    """One finished request, for metrics and logs."""

    model: str
    request_id: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    queue_time: float | None
    ttft: float | None
    e2e: float
    itls: tuple[float, ...] = ()
