"""Prometheus metrics: the only module that imports prometheus_client.

The engine emits plain stats records (StepStats per step, RequestStats per finished request) through callbacks;
this module turns them into series named after vLLM's (`vllm:x` is `attnserve_x` here), every engine series
labelled by `model`. Gauges that describe the engine's present state are also re-read at scrape time, so an
idle engine never leaves a stale value behind (an abort taken while idle runs no step)."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from service import __version__
from service.engine.engine import RequestStats, StepStats

if TYPE_CHECKING:
    from service.registry import ServedModel

PREFIX = "attnserve"
SHARED_DIR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = ("overload", "too_long", "invalid")

# Sub-millisecond CPU decode steps through tens of seconds of queueing
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class Metrics:
    """Every series of the service, on its own registry (so tests and several apps never collide)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `_created` twin series: the exposition holds only what dashboards use
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self._models: set[str] = set()

        def gauge(name: str, doc: str) -> Gauge:  # across frontends: the value the last one to sample it saw
            return Gauge(f"{PREFIX}_{name}", doc, m, registry=r, multiprocess_mode="livemostrecent")

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, [*m, *extra], registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, m, buckets=buckets, registry=r)

        # engine state (vllm:num_requests_running, num_requests_waiting, kv_cache_usage_perc)
        self.requests_running = gauge("requests_running", "Requests in the running batch")
        self.requests_waiting = gauge("requests_waiting", "Requests queued and not yet scheduled")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0 to 1)")
        self.kv_blocks = gauge("kv_blocks", "KV cache blocks in the pool")
        self.kv_free = gauge("kv_blocks_free", "Free KV cache blocks")
        self.kv_shared = gauge("kv_blocks_shared", "KV cache blocks referenced by more than one request now")
        self.engine_up = gauge("engine_up", "1 while the model's engine loop runs, 0 once it stopped or died")

        # counters (vllm:prompt_tokens_total, generation_tokens_total, request_success_total, num_preemptions)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests (aborted and failed "
                                     "ones included), counted when each request finishes")
        self.generation_tokens = counter("generation_tokens", "Tokens generated for finished requests, counted "
                                         "when each request finishes")
        self.finished = counter("requests_finished", "Finished requests by finish_reason (stop, length, abort, "
                                "error)", ("finish_reason",))
        self.overflowed = counter("streams_overflowed", "Streaming requests aborted because their client fell "
                                  "--max-stream-backlog outputs behind (stopped reading)")
        self.restarts = counter("engine_restarts", "Engine core processes started again after one died")
        self.preemptions = counter("preemptions", "Requests preempted to free KV blocks (recomputed later)")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                      "(each admitted request's tokens; vllm:prefix_cache_queries)")
        self.prefix_hits = counter("prefix_cache_hits", "Of the looked-up tokens, those whose KV blocks were "
                                   "already computed and were reused (vllm:prefix_cache_hits)")
        self.rejected = counter("requests_rejected", "Requests refused before reaching the engine, by reason "
                                "(overload, too_long, invalid); model is empty when the body named none validly",
                                ("reason",))
        self.http = counter("http_requests", "HTTP requests by route template, method and status",
                            ("route", "method", "status"))

        # per request (vllm:time_to_first_token_seconds, inter_token_latency_seconds, ...)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive generated tokens")
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Per request: mean time per output token after the first")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish")
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduling")
        self.req_prefill = histogram("request_prefill_time_seconds", "First scheduling to first token")
        self.req_decode = histogram("request_decode_time_seconds", "First token to last token")
        self.req_inference = histogram("request_inference_time_seconds", "First scheduling to finish")
        self.prompt_len = histogram("request_prompt_tokens", "Prompt length of finished requests", TOKEN_BUCKETS)
        self.gen_len = histogram("request_generation_tokens", "Generated length of finished requests",
                                 TOKEN_BUCKETS)

        # per engine step (TGI's batch_forward_duration{method}, vllm:iteration_tokens_total)
        self.step_prefill = histogram("prefill_step_time_seconds", "Forward + sampling of a step with prefill "
                                      "tokens (decode rows beside them included)")
        self.step_decode = histogram("decode_step_time_seconds", "Forward + sampling of a step that only decodes")
        self.step_time = histogram("step_time_seconds", "One whole engine step: schedule, execute, update")
        self.batch = histogram("batch_size", "Requests per engine step", BATCH_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens", "Tokens computed per engine step (prompt tokens "
                                          "prefilled + one per decoding request)", TOKEN_BUCKETS)

        self.info_registry = CollectorRegistry()  # Info series are per process even across frontends
        self.model_info = Info(f"{PREFIX}_model", "Served model", m, registry=self.info_registry)
        self.build_info = Info(f"{PREFIX}_build", "Service build", registry=self.info_registry)
        self.build_info.info({"version": __version__, "torch_version": torch.__version__,
                              "python_version": platform.python_version()})
        self._seen: dict[str, tuple[int, int]] = {}  # each engine's (overflows, restarts) at the last scrape
        self._per_model = [v for v in vars(self).values() if isinstance(v, Gauge | Counter | Histogram)]

    def add_model(self, name: str, details: Mapping[str, object]) -> None:
        """Create every series of a model at zero, so dashboards and rate() see it before its first request."""
        keys = ("architecture", "parameters", "dtype", "device", "context_length", "block_size", "heads", "kv_heads",
                "kv_bytes_per_token")  # with grouped-query attention kv_heads < heads: the cache holds only those
        self.model_info.labels(name).info({k: str(details.get(k, "")) for k in keys})
        for metric in self._per_model:
            if metric is self.finished:
                for reason in FINISH_REASONS:
                    metric.labels(name, reason)
            elif metric is self.rejected:
                for reason in REJECT_REASONS:
                    metric.labels(name, reason)
            elif metric is not self.http:
                metric.labels(name)
        blocks = float(details["kv_blocks"])  # type: ignore[arg-type]
        self.set_engine_state(name, up=True, running=0, waiting=0, blocks_total=blocks, blocks_free=blocks)
        self._models.add(name)

    def record_step(self, s: StepStats) -> None:
        """Engine thread, once per step. Steps before the model is added (warm-up) are not served traffic."""
        m = s.model
        if m not in self._models:
            return
        self.set_engine_state(m, up=True, running=s.num_running, waiting=s.num_waiting,
                              blocks_total=s.blocks_total, blocks_free=s.blocks_free)
        n = s.steps  # a decode burst (engine/burst.py): each of its steps observed, at their mean
        for _ in range(n):
            self.batch.labels(m).observe(s.batch_size)
            self.iteration_tokens.labels(m).observe((s.num_prefill_tokens + s.num_decode_tokens) / n)
            self.step_time.labels(m).observe(s.step_time / n)
            if s.num_prefill_tokens:
                self.step_prefill.labels(m).observe(s.prefill_time)
            if s.num_decode_tokens and not s.num_prefill_tokens:  # a mixed step's forward is the prefill's
                self.step_decode.labels(m).observe(s.decode_time / n)
        if s.num_preempted:
            self.preemptions.labels(m).inc(s.num_preempted)
        if s.prefix_queries:
            self.prefix_queries.labels(m).inc(s.prefix_queries)
            self.prefix_hits.labels(m).inc(s.prefix_hits)
        self.kv_shared.labels(m).set(s.blocks_shared)

    def record_finish(self, r: RequestStats) -> None:
        """Engine thread, once per finished request (aborted and failed ones included)."""
        m = r.model
        if m not in self._models:
            return
        reason = r.finish_reason if r.finish_reason in FINISH_REASONS else "error"
        self.finished.labels(m, reason).inc()
        self.prompt_tokens.labels(m).inc(r.prompt_tokens)
        self.generation_tokens.labels(m).inc(r.output_tokens)
        self.prompt_len.labels(m).observe(r.prompt_tokens)
        self.gen_len.labels(m).observe(r.output_tokens)
        self.e2e.labels(m).observe(r.e2e)
        if r.queue_time is not None:  # it was scheduled
            self.queue.labels(m).observe(r.queue_time)
            self.req_inference.labels(m).observe(max(0.0, r.e2e - r.queue_time))
        if r.ttft is None:  # no token was produced
            return
        self.ttft.labels(m).observe(r.ttft)
        if r.queue_time is not None:
            self.req_prefill.labels(m).observe(max(0.0, r.ttft - r.queue_time))
        decode = sum(r.itls)  # first token to last token
        self.req_decode.labels(m).observe(decode)
        if r.itls:
            self.tpot.labels(m).observe(decode / len(r.itls))
        for gap in r.itls:
            self.itl.labels(m).observe(gap)

    def record_rejection(self, model: str | None, reason: str) -> None:
        self.rejected.labels(model or "", reason).inc()

    def record_http(self, model: str | None, route: str, method: str, status: int) -> None:
        """`route` is the route's template (or one fixed value for unmatched paths): bounded cardinality."""
        self.http.labels(model or "", route, method, str(status)).inc()

    def set_engine_state(self, model: str, up: bool, running: int, waiting: int, blocks_total: float,
                         blocks_free: float) -> None:
        self.engine_up.labels(model).set(1 if up else 0)
        self.requests_running.labels(model).set(running)
        self.requests_waiting.labels(model).set(waiting)
        self.kv_blocks.labels(model).set(blocks_total)
        self.kv_free.labels(model).set(blocks_free)
        self.kv_usage.labels(model).set(1 - blocks_free / blocks_total if blocks_total else 0)

    def sample_engines(self, models: Mapping[str, ServedModel]) -> None:
        """Re-read each engine's public snapshot."""
        for name, served in models.items():
            snap = served.engine.snapshot()
            self.set_engine_state(name, up=snap.up, running=snap.num_running, waiting=snap.num_waiting,
                                  blocks_total=snap.blocks_total, blocks_free=snap.blocks_free)
            self.kv_shared.labels(name).set(snap.blocks_shared)
            seen = self._seen.get(name, (0, 0))
            self.overflowed.labels(name).inc(max(0, snap.streams_overflowed - seen[0]))
            self.restarts.labels(name).inc(max(0, snap.restarts - seen[1]))
            self._seen[name] = (snap.streams_overflowed, snap.restarts)

    def set_engine_up(self, model: str, up: bool) -> None:
        self.engine_up.labels(model).set(1 if up else 0)

    def render(self) -> bytes:
        """Every series; with several frontends (`share_across_processes`), each one's counters and histograms
        summed from the files all of them write."""
        registry = self.registry
        if SHARED_DIR in os.environ:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        return generate_latest(registry) + generate_latest(self.info_registry)


def share_across_processes(path: str) -> None:
    """Keep every series created from now on in files under `path` (prometheus_client's multiprocess mode), so
    that any frontend's /metrics shows all of them: requests counted where they were served, step histograms by
    the frontend that owns the engine cores, gauges as last sampled. Processes started later inherit it."""
    os.environ[SHARED_DIR] = path
    values.ValueClass = values.MultiProcessValue()


def shared_metrics() -> bool:
    """Whether this process's series are shared with other frontends' (`share_across_processes`)."""
    return SHARED_DIR in os.environ


def forget_process(pid: int) -> None:
    """A frontend that exited: its gauges no longer count."""
    if SHARED_DIR in os.environ:
        multiprocess.mark_process_dead(pid)
