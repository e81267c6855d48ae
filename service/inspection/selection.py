"""What to return: a request's kinds, layers, heads and query rows resolved against the model and the input
lengths, the values and bytes that selection weighs, and a smaller selection when it is over the limit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from model.config import TransformerConfig

CAUSAL = {"encoder_self": False, "decoder_self": True, "cross": False}
AXES = {"encoder_self": ("encoder", "encoder"), "decoder_self": ("decoder", "decoder"), "cross": ("decoder", "encoder")}
SELF_KINDS = ("encoder_self", "decoder_self")
MAP_OVERHEAD_BYTES = 400  # the JSON around one map's numbers (kind, layer, shape, mask text, ...)


class SelectionError(ValueError):
    """A selection the model cannot satisfy; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def model_kinds(cfg: TransformerConfig) -> tuple[str, ...]:
    return ("encoder_self", "decoder_self", "cross") if cfg.is_encoder_decoder else ("decoder_self",)


def num_layers(cfg: TransformerConfig, kind: str) -> int:
    return cfg.n_encoder_layers if kind == "encoder_self" else cfg.n_decoder_layers


def describe_attention(cfg: TransformerConfig, max_tokens: int, max_values: int) -> dict[str, Any]:
    """What GET /v1/models says about inspection: the kinds, their stacks, which are causal, the limits; with
    grouped-query attention, the K/V head each query head shares."""
    kinds = {k: {"layers": num_layers(cfg, k), "heads": cfg.h, "causal": CAUSAL[k], "queries": AXES[k][0],
                 "keys": AXES[k][1]} for k in model_kinds(cfg)}
    if cfg.kv_heads != cfg.h:  # maps are per query head; say which of them read the same K/V head
        group = cfg.h // cfg.kv_heads
        kinds["decoder_self"]["kv_heads"] = cfg.kv_heads
        kinds["decoder_self"]["kv_head_of_head"] = [i // group for i in range(cfg.h)]
    return {"kinds": kinds, "limits": {"max_tokens": max_tokens, "max_values": max_values},
            "aggregations": ["none", "mean", "max", "rollout"], "encodings": ["json", "base64"]}


@dataclass(frozen=True)
class Selection:
    """Which maps to return: per kind the layers, the heads, query rows [q_start, q_end), how to aggregate."""

    layers: dict[str, tuple[int, ...]]
    heads: tuple[int, ...]
    q_start: int
    q_end: dict[str, int]
    aggregation: str
    n_encoder: int
    n_decoder: int
    top_k: int | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.layers)

    def key_length(self, kind: str) -> int:
        return self.n_decoder if kind == "decoder_self" else self.n_encoder

    def query_length(self, kind: str) -> int:
        return self.n_encoder if kind == "encoder_self" else self.n_decoder

    @property
    def captured_layers(self) -> dict[str, tuple[int, ...]]:
        """The layers the capture pass must record: rollout needs every layer up to the deepest one returned."""
        if self.aggregation != "rollout":
            return dict(self.layers)
        return {k: tuple(range(max(v) + 1)) for k, v in self.layers.items()}

    @property
    def num_maps(self) -> int:
        return sum(len(v) for v in self.layers.values())

    @property
    def values(self) -> int:
        """Attention values this selection returns (an upper bound with top_k; dense count otherwise)."""
        h = len(self.heads) if self.aggregation == "none" else 1
        total = 0
        for kind, layers in self.layers.items():
            per_row = self.key_length(kind) if self.top_k is None else min(self.top_k, self.key_length(kind))
            total += len(layers) * h * (self.q_end[kind] - self.q_start) * per_row
        return total

    def as_request(self) -> dict[str, Any]:
        """The request fields that select exactly this (layers shared by the kinds: the shortest list)."""
        layers = min(self.layers.values(), key=len)
        ends = set(self.q_end.values())
        out: dict[str, Any] = {"kinds": list(self.kinds), "layers": list(layers), "heads": list(self.heads)}
        out["queries"] = {"start": self.q_start, "end": max(ends)} if len(ends) == 1 else {"start": self.q_start}
        return out


def resolve(
    cfg: TransformerConfig, kinds: Sequence[str] | None, layers: list[int] | None, heads: list[int] | None,
    q_start: int, q_end: int | None, aggregation: str, n_encoder: int, n_decoder: int, top_k: int | None = None,
) -> Selection:
    """Check a request's selection against the model and the input lengths (SelectionError names the field)."""
    available = model_kinds(cfg)
    if kinds is None:
        kinds = [k for k in available if aggregation != "rollout" or k in SELF_KINDS]
    for k in kinds:
        if k not in available:
            raise SelectionError(f"kind '{k}' does not exist in this {cfg.arch} model; it has {list(available)}",
                                 "kinds")
        if aggregation == "rollout" and k not in SELF_KINDS:
            raise SelectionError("rollout is defined for self-attention (encoder_self, decoder_self), not "
                                 f"'{k}'", "kinds")
    if not kinds:
        raise SelectionError("kinds must not be empty", "kinds")
    per_kind: dict[str, tuple[int, ...]] = {}
    for k in dict.fromkeys(kinds):
        n = num_layers(cfg, k)
        chosen = sorted(set(layers)) if layers is not None else list(range(n))
        bad = [i for i in chosen if not 0 <= i < n]
        if bad or not chosen:
            raise SelectionError(f"layer {bad[0] if bad else '(none)'} is out of range for {k}: the model has {n} "
                                 f"layers (0..{n - 1})", "layers")
        per_kind[k] = tuple(chosen)
    chosen_heads = sorted(set(heads)) if heads is not None else list(range(cfg.h))
    bad_heads = [i for i in chosen_heads if not 0 <= i < cfg.h]
    if bad_heads or not chosen_heads:
        raise SelectionError(f"head {bad_heads[0] if bad_heads else '(none)'} is out of range: the model has "
                             f"{cfg.h} heads (0..{cfg.h - 1})", "heads")
    ends: dict[str, int] = {}
    for k in per_kind:
        n_q = n_encoder if k == "encoder_self" else n_decoder
        end = n_q if q_end is None else min(q_end, n_q)
        if q_start >= end:
            raise SelectionError(f"queries [{q_start}, {q_end}) select no position of {k}, whose queries are "
                                 f"0..{n_q - 1}", "queries")
        ends[k] = end
    return Selection(per_kind, tuple(chosen_heads), q_start, ends, aggregation, n_encoder, n_decoder, top_k)


def fit(sel: Selection, limit: int) -> Selection | None:
    """A smaller selection within `limit` values: fewer layers, then heads, then kinds, then query rows."""
    while sel.values > limit:
        deepest = max(sel.layers, key=lambda k: len(sel.layers[k]))
        rows = min(sel.q_end.values()) - sel.q_start
        if len(sel.layers[deepest]) > 1:
            sel = replace(sel, layers={**sel.layers, deepest: sel.layers[deepest][:-1]})
        elif sel.aggregation == "none" and len(sel.heads) > 1:
            sel = replace(sel, heads=sel.heads[:-1])
        elif len(sel.layers) > 1:
            sel = replace(sel, layers=dict(list(sel.layers.items())[:-1]))
        elif rows > 1:
            sel = replace(sel, q_end={k: sel.q_start + (rows + 1) // 2 for k in sel.q_end})
        else:
            return None
    return sel


def estimated_bytes(sel: Selection, encoding: str, precision: int, sparse: bool) -> int:
    """What the maps will weigh on the wire (JSON: a float is ~precision + 3 characters)."""
    n = sel.values
    per_value = (precision + 3 + (4 if sparse else 0)) if encoding == "json" else (4 if sparse else 2) * 4 / 3
    return int(n * per_value) + MAP_OVERHEAD_BYTES * sel.num_maps
