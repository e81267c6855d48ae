"""The attention rows /v1/generate streams with each token: the engine's AttentionSpec from a request's selection,
and the `attention` field of one token event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model.config import TransformerConfig
from service.engine.request import AttentionSpec, StepOutput
from service.inspection.selection import SelectionError, resolve

FIELD = "return_attention"


def stream_spec(cfg: TransformerConfig, kinds: Sequence[str] | None, layers: list[int] | None,
                heads: list[int] | None, aggregation: str) -> AttentionSpec:
    """The engine's record of a streamed selection (decoder_self by default); SelectionError names the field."""
    try:
        sel = resolve(cfg, list(kinds or ["decoder_self"]), layers, heads, 0, None, aggregation, 1, 1)
    except SelectionError as e:
        raise SelectionError(str(e), f"{FIELD}.{e.param}") from e
    return AttentionSpec(tuple(sel.layers), next(iter(sel.layers.values())), sel.heads, aggregation)


def streamed_attention(spec: AttentionSpec, out: StepOutput) -> dict[str, Any] | None:
    """The `attention` field of an SSE token event (StreamedAttention)."""
    if out.attention is None:
        return None
    return {"layers": list(spec.layers or ()), "heads": list(spec.heads or ()), "aggregation": spec.aggregation,
            **out.attention}
