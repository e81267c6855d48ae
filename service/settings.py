"""`Settings`: every knob of the service, from ATTNSERVE_* environment variables or CLI flags; read once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "model" / "checkpoints"


class SettingsError(ValueError):
    """A setting the server cannot honour (an unknown --default-model); the start stops with its message."""


class Settings(BaseSettings):
    """Service configuration. Environment: ATTNSERVE_<NAME>; lists as JSON (e.g. ATTNSERVE_API_KEYS='["k1"]')."""

    model_config = SettingsConfigDict(env_prefix="ATTNSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: Path | None = Field(default=SHIPPED_MODELS, description="serve every checkpoint folder under it")
    models: list[Path] = Field(default_factory=list, description="extra checkpoint folders (ours or GPT-2)")
    default_model: str | None = Field(default=None, description="the model of requests that name none (default: "
                                      "the largest served decoder-only language model by parameter count; with "
                                      "none served, the first model by name); an unknown name stops the start")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="the KV cache's storage (auto: the activations' dtype, but bfloat16 under an "
        "int8 model's float32 activations, as llama.cpp keeps a Q8_0 model's cache in 16 bits)")
    quantization: Literal["none", "int8"] = Field(default="none", description="int8: weight-only int8 linears "
                                                  "(one scale per output channel); activations in the dtype")
    threads: int | None = Field(default=None, description="torch intra-op threads (default: torch's choice)")

    # engine
    block_size: int = 16
    kv_cache_blocks: int | None = Field(default=None, description="KV blocks per model (overrides the bytes)")
    kv_cache_bytes: int = 2**30
    max_model_len: int | None = Field(default=None, description="the longest request (prompt + output) served "
                                      "(default: the model's context, capped to the KV cache's share per sequence "
                                      "for max_num_seqs sequences, never below 512 tokens)")
    max_num_seqs: int = 64
    max_num_batched_tokens: int = Field(default=512, description="token budget of one engine step; longer "
                                        "prompts are prefilled in chunks of it (chunked prefill)")
    enforce_eager: bool = Field(default=False, description="module calls for every step: no CUDA graphs, no fused CPU step")
    enable_prefix_caching: bool = Field(default=True, description="reuse the KV blocks of a prompt prefix already "
                                        "computed (automatic prefix caching)")
    num_scheduler_steps: int = Field(default=32, ge=1, le=64, description="decode steps one engine iteration may "
                                     "run for the same streams where steps are short (vLLM's multi-step "
                                     "scheduling; 1: one step per iteration)")
    max_burst_ms: float = Field(default=16.0, gt=0, le=1000, description="the longest a decode burst runs "
                                "before its tokens are sent; a new request or an abort ends a burst at once")
    max_waiting_requests: int = 512
    max_waiting_tokens: int = 262144
    queue_timeout: float | None = 60.0
    warmup: bool = True
    engine_in_process: bool = Field(default=False, description="run each engine on a thread of the server "
                                    "process instead of in its own core process")
    api_server_count: int = Field(default=1, ge=1, le=64, description="HTTP frontend processes sharing the "
                                  "listening socket and every model's engine core (vLLM's --api-server-count)")
    on_engine_death: Literal["restart", "exit"] = Field(default="restart", description="when an engine core "
                                                        "process dies: start a new one, or stop the server "
                                                        "(exit status 3) for its supervisor to restart")
    max_stream_backlog: int = Field(default=1024, description="outputs a streaming client may fall behind "
                                    "before its request is aborted")

    # request limits
    max_tokens_limit: int = 4096
    max_n: int = 8
    max_stop_sequences: int = 8
    max_stop_length: int = 64
    max_body_bytes: int = 1 * 2**20
    max_logprobs: int = 20

    # inspection limits
    inspect_max_tokens: int = 512
    inspect_max_values: int = 2_000_000

    # operations
    api_keys: list[str] = Field(default_factory=list)
    api_keys_file: Path | None = None
    metrics_require_auth: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    drain_timeout: float = 30.0
    log_prompts: bool = False
    log_probes: bool = Field(default=False, description="access-log lines for /health and /ready too")
    log_json: bool = True
    log_level: str = "info"

    def all_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            keys += [k.strip() for k in self.api_keys_file.read_text().splitlines() if k.strip()]
        return keys
