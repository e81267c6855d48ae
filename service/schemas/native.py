"""The native API: POST /v1/generate (JSON or SSE), tokenize and detokenize."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import MAX_TEXT_CHARS, ConstraintFields, SamplingFields, Usage
from service.schemas.inspection import AttentionStreamSpec


class GenerateRequest(SamplingFields, ConstraintFields):
    """Native generation: the prompt (for a translator, the source sentence) and sampling fields."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"model": "shakespeare-gpt", "prompt": "ROMEO:", "max_tokens": 32, "temperature": 0.8, "seed": 1},
            {"model": "multi30k-en-de", "prompt": "Two dogs play in the snow.", "temperature": 0, "stream": True},
            {"model": "multi30k-en-de", "prompt": "Two dogs play in the snow.", "beam_width": 4},
        ]},
    )

    prompt: str = Field(..., description="text to continue, or the source sentence for a translator")
    logprobs: int | None = Field(None, ge=0, description="top-N alternatives per token (0: the chosen one only)")
    return_attention: AttentionStreamSpec | None = Field(
        None, description="stream each generated token's attention row (stream must be true)"
    )
    beam_width: int | None = Field(None, ge=1, description="beam search of this width (the best hypothesis is the "
                                   "answer; sampling fields are not used); none or 1: sampling as asked")
    length_penalty: float | None = Field(None, description="with beam_width: alpha of the GNMT length penalty "
                                         "((5 + length) / 6) ** alpha (default 0.6, the paper's)")


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


class TokenizeRequest(BaseModel):
    """Text to tokenize with a model's tokenizer."""

    model_config = ConfigDict(extra="forbid", str_max_length=MAX_TEXT_CHARS, json_schema_extra={
        "examples": [{"model": "multi30k-en-de", "text": "Two dogs play in the snow."}]})
    model: str | None = Field(None, description="a served model's name; the default model if omitted")
    text: str


class TokenizeResponse(BaseModel):
    model: str
    tokens: list[int]
    token_strings: list[str]
    count: int


class DetokenizeRequest(BaseModel):
    """Token ids to turn back into text."""

    model_config = ConfigDict(extra="forbid", str_max_length=MAX_TEXT_CHARS, json_schema_extra={
        "examples": [{"model": "shakespeare-gpt", "tokens": [34, 31, 29, 21, 31, 14]}]})
    model: str | None = Field(None, description="a served model's name; the default model if omitted")
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    model: str
    text: str
