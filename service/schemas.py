"""Every request and response body of the API: native, OpenAI-compatible and inspection.

Limits that depend on settings (max_tokens cap, n, stop lists) are checked in the routes with messages that
name the field and the limit; the bounds here are the ones that hold for any deployment."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# --- shared -------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used by every endpoint."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SamplingFields(BaseModel):
    """The sampling fields shared by the native and OpenAI-compatible endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="a served model's name; the default model if omitted")
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same text, at any load")
    stop: str | list[str] | None = Field(None, description="stop sequences; never part of the output")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks)")
    stream: bool = False


# --- native -------------------------------------------------------------------------------------------------


class AttentionStreamSpec(BaseModel):
    """Attention rows to stream with each generated token (decoder self-attention over earlier positions)."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(None, description="layer indices; all if omitted")
    heads: list[int] | None = Field(None, description="head indices; all if omitted")
    aggregation: Literal["none", "mean", "max"] = "mean"


class GenerateRequest(SamplingFields):
    """Native generation: the prompt (for a translator, the source sentence) and sampling fields."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0.8, "seed": 1}]},
    )

    prompt: str = Field(..., description="text to continue, or the source sentence for a translator")
    logprobs: int | None = Field(None, ge=0, description="top-N alternatives per token (0: the chosen one only)")
    return_attention: AttentionStreamSpec | None = Field(
        None, description="stream each generated token's attention row (stream must be true)"
    )


class Timing(BaseModel):
    queue_time: float | None = Field(None, description="seconds waiting before the first step")
    time_to_first_token: float | None = None
    total_time: float | None = None


class TokenInfo(BaseModel):
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    timing: Timing
    tokens: list[TokenInfo] | None = Field(None, description="per-token logprobs when asked for")


# --- OpenAI-compatible completions ---------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(SamplingFields):
    """OpenAI's /v1/completions request (plus top_k, repetition_penalty, ignore_eos as vLLM accepts)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"model": "shakespeare-gpt", "prompt": "ROMEO:", "max_tokens": 32}]},
    )

    prompt: str | list[str] | list[int] | list[list[int]] = Field(..., description="text, texts or token ids")
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --- models, tokenizer ----------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "attnserve"
    details: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    text: str


class TokenizeResponse(BaseModel):
    model: str
    tokens: list[int]
    token_strings: list[str]
    count: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    model: str
    text: str


class HealthResponse(BaseModel):
    status: str
    models: dict[str, str] = Field(default_factory=dict)
