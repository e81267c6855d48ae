"""What every surface shares: OpenAI's error shape, usage counts, the sampling fields, health.

Limits that depend on settings (max_tokens cap, n, stop lists) are checked in the routes with messages that
name the field and the limit; the bounds here are the ones that hold for any deployment."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

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
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy; omitted: 1, or 0 for a "
                               "translator (encoder-decoder), which decodes greedily by default")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 (or vLLM's -1) disables top-k")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens below min_p x the top token's probability")
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0, description="1 is off; below 0.01 logits overflow")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same text, at any load")
    stop: str | list[str] | None = Field(None, description="stop sequences; never part of the output")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks)")
    min_tokens: int = Field(0, ge=0, description="EOS and stop_token_ids cannot end the output before this many")
    include_stop_str_in_output: bool = Field(False, description="keep the stop string that ended the output")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI documents these fields as nullable: an explicit null is the default, as if omitted (so a null
        max_tokens is capped like an omitted one, never refused)."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core))
        for name, prop in schema.get("properties", {}).items():  # say so in the schema: null is accepted
            if name in schema.get("required", ()) or {"type": "null"} in prop.get("anyOf", ()):
                continue
            kept = {k: prop.pop(k) for k in ("title", "description", "default", "examples") if k in prop}
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **kept}
        return schema


class SamplingFields(Sampling):
    """The fields of a generation request body: which model, how to sample, whether to stream."""

    model: str | None = Field(None, description="a served model's name; the default model if omitted")
    stream: bool = False


class ConstraintFields(BaseModel):
    """Structured output: the fields that hold the output to a schema, regex, choice or grammar (one at most)."""

    response_format: dict[str, Any] | None = Field(None, description="OpenAI's: {'type': 'json_object'} or "
                                                   "{'type': 'json_schema', 'json_schema': {'name', 'schema'}}")
    structured_outputs: dict[str, Any] | None = Field(None, description="vLLM's: one of json (a schema), regex, "
                                                      "choice (strings), grammar (EBNF / GBNF), json_object")
    guided_json: Any = Field(None, description="vLLM's older field: a JSON schema")
    guided_regex: str | None = Field(None, description="vLLM's older field: a regex")
    guided_choice: list[str] | None = Field(None, description="vLLM's older field: one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM's older field: an EBNF (GBNF) grammar")


class HealthResponse(BaseModel):
    status: str
    models: dict[str, str] = Field(default_factory=dict)
