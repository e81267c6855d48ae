"""Prometheus metrics: the only module that imports prometheus_client. The engine emits plain stats records
(StepStats per step, RequestStats per finished request); this module turns them into series."""

from __future__ import annotations

import platform

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service import __version__
from service.engine.engine import RequestStats, StepStats

PREFIX = "attnserve"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# CPU-scale milliseconds through tens of seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class Metrics:
    """Every series of the service, on its own registry (so tests and several apps never collide)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.requests_running = Gauge(f"{PREFIX}_requests_running", "Requests in the running batch", m, registry=r)
        self.requests_waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests waiting to start", m, registry=r)
        self.kv_usage = Gauge(f"{PREFIX}_kv_cache_usage_ratio", "Fraction of KV blocks in use", m, registry=r)
        self.kv_total = Gauge(f"{PREFIX}_kv_blocks_total", "KV blocks in the pool", m, registry=r)
        self.kv_free = Gauge(f"{PREFIX}_kv_blocks_free", "Free KV blocks", m, registry=r)
        self.engine_up = Gauge(f"{PREFIX}_engine_up", "1 while the engine loop runs", m, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests", m, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens", m, registry=r)
        self.finished = Counter(f"{PREFIX}_request_finished", "Finished requests", m + ["finish_reason"], registry=r)
        self.preemptions = Counter(f"{PREFIX}_preemptions", "Requests preempted for KV blocks", m, registry=r)
        self.rejected = Counter(f"{PREFIX}_requests_rejected", "Refused requests", m + ["reason"], registry=r)
        self.http = Counter(f"{PREFIX}_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between tokens", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Mean time per output token after the first",
                              m, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to finish", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(f"{PREFIX}_request_queue_time_seconds", "Arrival to first scheduling", m,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram(f"{PREFIX}_prefill_time_seconds", "Prefill forward per step", m,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.decode = Histogram(f"{PREFIX}_decode_step_time_seconds", "Decode forward per step", m,
                                buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram(f"{PREFIX}_batch_size", "Requests per engine step", m, buckets=BATCH_BUCKETS, registry=r)
        self.prompt_len = Histogram(f"{PREFIX}_request_prompt_tokens", "Prompt length", m, buckets=TOKEN_BUCKETS,
                                    registry=r)
        self.gen_len = Histogram(f"{PREFIX}_request_generation_tokens", "Generation length", m,
                                 buckets=TOKEN_BUCKETS, registry=r)
        self.model_info = Info(f"{PREFIX}_model", "Served model", m, registry=r)
        self.build_info = Info(f"{PREFIX}_build", "Build", registry=r)
        self.build_info.info({"version": __version__, "torch": torch.__version__, "python": platform.python_version()})

    def add_model(self, name: str, details: dict[str, object]) -> None:
        self.model_info.labels(name).info({k: str(details[k]) for k in ("architecture", "parameters", "dtype", "device")})
        self.engine_up.labels(name).set(1)
        self.kv_total.labels(name).set(float(details["kv_blocks"]))  # type: ignore[arg-type]
        self.kv_free.labels(name).set(float(details["kv_blocks"]))  # type: ignore[arg-type]
        self.kv_usage.labels(name).set(0)
        self.requests_running.labels(name).set(0)
        self.requests_waiting.labels(name).set(0)
        for reason in ("stop", "length", "abort", "error"):
            self.finished.labels(name, reason)
        for reason in ("overload", "too_long", "invalid"):
            self.rejected.labels(name, reason)
        for c in (self.prompt_tokens, self.generation_tokens, self.preemptions):
            c.labels(name)

    def record_step(self, s: StepStats) -> None:
        m = s.model
        self.requests_running.labels(m).set(s.num_running)
        self.requests_waiting.labels(m).set(s.num_waiting)
        self.kv_free.labels(m).set(s.blocks_free)
        self.kv_usage.labels(m).set(1 - s.blocks_free / s.blocks_total if s.blocks_total else 0)
        self.batch.labels(m).observe(s.batch_size)
        if s.num_prefill_tokens:
            self.prefill.labels(m).observe(s.prefill_time)
        if s.num_decode_tokens:
            self.decode.labels(m).observe(s.decode_time)
        if s.num_preempted:
            self.preemptions.labels(m).inc(s.num_preempted)

    def record_finish(self, r: RequestStats) -> None:
        m = r.model
        self.finished.labels(m, r.finish_reason).inc()
        self.prompt_tokens.labels(m).inc(r.prompt_tokens)
        self.generation_tokens.labels(m).inc(r.output_tokens)
        self.prompt_len.labels(m).observe(r.prompt_tokens)
        self.gen_len.labels(m).observe(r.output_tokens)
        self.e2e.labels(m).observe(r.e2e)
        if r.queue_time is not None:
            self.queue.labels(m).observe(r.queue_time)
        if r.ttft is not None:
            self.ttft.labels(m).observe(r.ttft)
            if r.output_tokens > 1:
                self.tpot.labels(m).observe((r.e2e - r.ttft) / (r.output_tokens - 1))
        for gap in r.itls:
            self.itl.labels(m).observe(gap)

    def record_rejection(self, model: str | None, reason: str) -> None:
        self.rejected.labels(model or "", reason).inc()

    def record_http(self, route: str, method: str, status: int) -> None:
        self.http.labels(route, method, str(status)).inc()

    def set_engine_up(self, model: str, up: bool) -> None:
        self.engine_up.labels(model).set(1 if up else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
