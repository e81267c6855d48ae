"""What every surface shares: OpenAI's error shape, usage counts, the sampling fields, health.

Limits that depend on settings (max_tokens cap, n, stop lists) are checked in the routes with messages that
name the field and the limit; the bounds here are the ones that hold for any deployment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Any string constraint makes pydantic check that a string is valid Unicode: a lone surrogate ("\\ud800" in
# JSON) is refused as a 400 naming the field instead of failing in the tokenizer. The body limit bounds it anyway.
MAX_TEXT_CHARS = 2**20


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


class Sampling(BaseModel):
    """How to sample: the knobs of every endpoint that generates (no model, no streaming)."""

    model_config = ConfigDict(extra="forbid", str_max_length=MAX_TEXT_CHARS)

    max_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0, description="1 is off; below 0.01 logits overflow")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same text, at any load")
    stop: str | list[str] | None = Field(None, description="stop sequences; never part of the output")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks)")


class SamplingFields(Sampling):
    """The fields of a generation request body: which model, how to sample, whether to stream."""

    model: str | None = Field(None, description="a served model's name; the default model if omitted")
    stream: bool = False


class HealthResponse(BaseModel):
    status: str
    models: dict[str, str] = Field(default_factory=dict)
