"""Inspection: POST /v1/attention, the attention rows streamed by /v1/generate, and the per-model facts."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.schemas.common import MAX_TEXT_CHARS, ConstraintFields, Sampling

AttentionKind = Literal["encoder_self", "decoder_self", "cross"]
SequenceName = Literal["encoder", "decoder"]


class AttentionStreamSpec(BaseModel):
    """Attention rows to stream with each generated token (decoder self-attention over earlier positions)."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[Literal["decoder_self", "cross"]] | None = Field(
        None, description="decoder_self (the default) and/or cross (translators)")
    layers: list[int] | None = Field(None, description="layer indices; all if omitted")
    heads: list[int] | None = Field(None, description="head indices; all if omitted")
    aggregation: Literal["none", "mean", "max"] = "mean"


class QueryRange(BaseModel):
    """Query positions [start, end) of every selected map (end omitted: to the last position)."""

    model_config = ConfigDict(extra="forbid")

    start: int = Field(0, ge=0)
    end: int | None = Field(None, ge=1)


class Sparsify(BaseModel):
    """Keep the top_k largest weights of every row, or the weights >= threshold (give exactly one)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one(self) -> Sparsify:
        if (self.top_k is None) == (self.threshold is None):
            raise ValueError("give exactly one of top_k and threshold")
        return self


class AttentionRequest(ConstraintFields):
    """Teacher-forced attention of one input, with selection, aggregation, sparsification and encoding.

    A decoder-only model reads `prompt`; a translator reads `source` (or `prompt`) and an optional `target`.
    With `generate` and no target, the server first generates the continuation as `sampling` says (held to a
    constraint if one of the structured-output fields gives one), then inspects input + output in one pass.
    Nothing streams here: /v1/generate with `return_attention` does."""

    model_config = ConfigDict(
        extra="forbid", str_max_length=MAX_TEXT_CHARS,
        json_schema_extra={"examples": [
            {"model": "shakespeare-gpt", "prompt": "ROMEO: But soft", "layers": [0], "aggregation": "mean"},
            {"model": "multi30k-en-de", "source": "Two dogs play in the snow.", "generate": True,
             "sampling": {"max_tokens": 20, "temperature": 0}, "kinds": ["cross"], "encoding": "base64"},
        ]},
    )

    model: str | None = Field(None, description="a served model's name; the default model if omitted")
    prompt: str | None = Field(None, description="a decoder-only model's text (a translator takes it as source)")
    source: str | None = Field(None, description="a translator's source sentence")
    target: str | None = Field(None, description="a translator's target sentence (teacher-forced after BOS)")
    generate: bool = Field(False, description="generate the continuation/target first, then inspect it all")
    kinds: list[AttentionKind] | None = Field(None, description="attention kinds; all the model has if omitted")
    layers: list[int] | None = Field(None, description="layer indices within each kind's stack; all if omitted")
    heads: list[int] | None = Field(None, description="head indices; all if omitted")
    queries: QueryRange | None = Field(None, description="query positions to return; all if omitted")
    aggregation: Literal["none", "mean", "max", "rollout"] = Field(
        "none", description="none: per head; mean/max over the heads; rollout: Abnar & Zuidema 2020 (self-attention)"
    )
    stats: bool = Field(False, description="per-head statistics: row entropy and the share on the first token")
    return_weights: bool = Field(True, description="false: statistics only, no weights")
    sparsify: Sparsify | None = Field(None, description="send only the largest weights of each row")
    encoding: Literal["json", "base64"] = Field("json", description="JSON floats, or base64 little-endian float16")
    precision: int = Field(4, ge=1, le=8, description="decimal places of JSON floats")
    format: Literal["json", "png"] = Field("json", description="png: a rendered heatmap (grid when several maps)")
    dry_run: bool = Field(False, description="report what would be sent (values, bytes, limits); compute nothing")
    sampling: Sampling = Field(default_factory=lambda: Sampling.model_validate({}),
                               description="with `generate`: how to sample (the fields of /v1/generate; also "
                               "accepted flat at the top level)")

    @model_validator(mode="before")
    @classmethod
    def _flat_sampling(cls, data: Any) -> Any:
        """Accept the sampling fields at the top level too (the shape before `sampling` existed)."""
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in Sampling.model_fields if k in data}
        if not flat:
            return data
        nested = data.get("sampling")
        if nested is not None and not isinstance(nested, dict):
            return data  # let the field's own validation name the problem
        rest = {k: v for k, v in data.items() if k not in flat}
        return {**rest, "sampling": {**flat, **(nested or {})}}


class TokenView(BaseModel):
    """One token: id, its text, and its [start, end) character span in the sequence's text (null for specials)."""

    id: int
    text: str
    start: int | None = None
    end: int | None = None
    special: bool = False
    generated: bool = False


class EncodedArray(BaseModel):
    """A row-major array as base64 of its little-endian bytes."""

    dtype: Literal["float16", "uint16", "int32"]
    shape: list[int]
    byteorder: Literal["little"] = "little"
    data: str


class SparseRows(BaseModel):
    """The kept cells of every (head, query) row, keys ascending; `kept_mass` is each row's kept share."""

    method: Literal["top_k", "threshold"]
    parameter: float
    indices: list[list[list[int]]] | None = Field(None, description="json: (H, T_q, kept) key indices")
    values: list[list[list[float]]] | None = Field(None, description="json: (H, T_q, kept) weights")
    row_ptr: EncodedArray | None = Field(None, description="base64: (H*T_q + 1,) offsets into indices/values")
    indices_data: EncodedArray | None = Field(None, description="base64: (nnz,) key indices")
    values_data: EncodedArray | None = Field(None, description="base64: (nnz,) weights")
    kept_mass: list[list[float]] = Field(description="(H, T_q) sum of the kept weights of each row")
    kept_mass_min: float
    kept_mass_mean: float


class HeadStats(BaseModel):
    """Statistics of one head (or of the aggregated map) over the selected query rows."""

    head: int | str
    entropy: float = Field(description="mean row entropy in nats")
    max_entropy: float = Field(description="mean over rows of log(number of visible keys)")
    first_token: float = Field(description="mean share of attention on key 0")


class AttentionMap(BaseModel):
    """One (kind, layer) map: weights (H, T_q, T_k) for the listed heads (H = 1 when aggregated)."""

    kind: AttentionKind
    layer: int
    heads: list[int] = Field(description="the heads on the first axis, or the heads that were aggregated")
    aggregation: Literal["none", "mean", "max", "rollout"]
    queries: SequenceName
    keys: SequenceName
    query_start: int
    query_end: int
    shape: list[int]
    causal: bool
    mask: str | None = Field(None, description="which cells are masked (cannot be attended), when any are")
    weights: list[list[list[float | None]]] | None = Field(None, description="json: masked cells are null")
    data: EncodedArray | None = Field(None, description="base64 float16; masked cells hold 0, see `mask`")
    sparse: SparseRows | None = None
    stats: list[HeadStats] | None = None


class InspectionLimits(BaseModel):
    max_tokens: int = Field(description="tokens per inspection (source + target/prompt + max_tokens)")
    max_values: int = Field(description="attention values per response")


class AttentionResponse(BaseModel):
    model: str
    architecture: str
    encoder_text: str | None = None
    decoder_text: str
    encoder_tokens: list[TokenView] | None = None
    decoder_tokens: list[TokenView]
    generated_tokens: int = Field(0, description="decoder tokens produced by `generate` (at the end)")
    values: int = Field(description="attention values in this response")
    maps: list[AttentionMap]
    limits: InspectionLimits
    compute_time: float = Field(description="seconds of the capture pass")


class AttentionDryRun(BaseModel):
    model: str
    dry_run: Literal[True] = True
    encoder_tokens: int
    decoder_tokens: int = Field(description="prompt/target tokens, plus max_tokens when generating (an upper bound)")
    maps: int
    values: int
    estimated_bytes: int
    within_limits: bool
    message: str | None = Field(None, description="why it would be refused, and a selection that fits")
    limits: InspectionLimits


class StreamedAttention(BaseModel):
    """The `attention` of one SSE token event: the row of the query that produced this token."""

    query_position: int = Field(description="decoder position of the query (the token before this one)")
    layers: list[int]
    heads: list[int] = Field(description="heads per row, or the heads that were aggregated")
    aggregation: Literal["none", "mean", "max"]
    decoder_self: list[list[list[float]]] | None = Field(None, description="(layers, heads, query_position + 1)")
    cross: list[list[list[float]]] | None = Field(None, description="(layers, heads, source tokens)")
