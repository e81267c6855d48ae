"""Attention inspection: resolve a selection against a model, run one teacher-forced capture pass (the explicit
attention path, batch 1), aggregate over heads, roll out through layers, summarize heads, sparsify rows and
encode compactly. Torch and numpy only; the route translates to and from HTTP."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.attention import AttentionCapture
from model.config import TransformerConfig
from model.tokenizer import Tokenizer
from model.transformer import DecoderOnlyLM, Transformer

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
    """What GET /v1/models says about inspection: the kinds, their stacks, which are causal, the limits."""
    kinds = {k: {"layers": num_layers(cfg, k), "heads": cfg.h, "causal": CAUSAL[k], "queries": AXES[k][0],
                 "keys": AXES[k][1]} for k in model_kinds(cfg)}
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


# --- the capture pass --------------------------------------------------------------------------------------------


def capture(model: Transformer | DecoderOnlyLM, encoder_ids: list[int], decoder_ids: list[int],
            sel: Selection) -> dict[tuple[str, int], Tensor]:
    """One teacher-forced forward at batch 1: weights per (kind, layer) as (h, T_q, T_k) float32 on the CPU.

    Read-only on the model (no cache, no mode switch), so it may run beside the engine's thread."""
    wanted = {k: range(max(v) + 1) if sel.aggregation == "rollout" else v for k, v in sel.layers.items()}
    cap = AttentionCapture(wanted, {i for v in wanted.values() for i in v})
    device = next(model.parameters()).device
    with torch.inference_mode():
        dec = torch.tensor([decoder_ids], device=device)  # (1, T)
        if isinstance(model, Transformer):
            memory = model.encode(torch.tensor([encoder_ids], device=device), capture=cap)  # (1, S, d_model)
            if "decoder_self" in wanted or "cross" in wanted:
                model.decode(dec, memory=memory, capture=cap)
        else:
            model.decode(dec, capture=cap)
    return {key: w[0].float().cpu() for key, w in cap.weights.items() if key[1] in wanted.get(key[0], ())}


# --- maps: aggregation, rollout, statistics, sparsification -------------------------------------------------------


@dataclass
class MapData:
    """One returned map: weights (H, T_q, T_k) for query rows [q_start, q_end); masked cells hold 0."""

    kind: str
    layer: int
    heads: tuple[int, ...]
    aggregation: str
    q_start: int
    weights: Tensor

    @property
    def causal(self) -> bool:
        return CAUSAL[self.kind]

    @property
    def visible(self) -> Tensor:
        """(T_q, T_k) True where the query may attend the key."""
        t_q, t_k = self.weights.shape[1:]
        if not self.causal:
            return torch.ones(t_q, t_k, dtype=torch.bool)
        return torch.arange(t_k)[None, :] <= (self.q_start + torch.arange(t_q))[:, None]


def aggregate(w: Tensor, how: str) -> Tensor:
    """(H, T_q, T_k) -> (1, T_q, T_k) mean or max over heads; `none` keeps the heads."""
    if how == "mean":
        return w.mean(0, keepdim=True)
    if how == "max":
        return w.amax(0, keepdim=True)
    return w


def rollout(mats: list[Tensor]) -> list[Tensor]:
    """Attention rollout (Abnar & Zuidema 2020): A_hat = rownorm(A + I) per layer, R_l = A_hat_l @ R_{l-1}.

    mats: head-averaged (T, T) attention of layers 0..L-1; returns R_0..R_{L-1}."""
    out: list[Tensor] = []
    eye = torch.eye(mats[0].shape[-1], dtype=mats[0].dtype)
    for a in mats:
        a_hat = a + eye  # the residual connection carries the token itself
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        out.append(a_hat if not out else a_hat @ out[-1])
    return out


def build_maps(weights: dict[tuple[str, int], Tensor], sel: Selection) -> list[MapData]:
    heads = list(sel.heads)
    maps: list[MapData] = []
    for kind, layers in sel.layers.items():
        rows = slice(sel.q_start, sel.q_end[kind])
        if sel.aggregation == "rollout":
            rolled = rollout([weights[(kind, i)][heads].mean(0) for i in range(max(layers) + 1)])
            maps += [MapData(kind, i, sel.heads, "rollout", sel.q_start, rolled[i][None, rows]) for i in layers]
        else:
            maps += [MapData(kind, i, sel.heads, sel.aggregation, sel.q_start,
                             aggregate(weights[(kind, i)][heads][:, rows], sel.aggregation)) for i in layers]
    return maps


def head_stats(m: MapData) -> list[dict[str, Any]]:
    """Per head: mean row entropy (nats), mean log(visible keys) as its ceiling, mean share on key 0."""
    w = m.weights.double()
    entropy = -(w * torch.where(w > 0, w.log(), torch.zeros_like(w))).sum(-1).mean(-1)  # (H,)
    ceiling = m.visible.sum(-1).double().log().mean().item()
    first = w[..., 0].mean(-1)
    labels: list[int | str] = list(m.heads) if m.aggregation == "none" else [m.aggregation]
    return [{"head": lab, "entropy": round(e, 6), "max_entropy": round(ceiling, 6), "first_token": round(f, 6)}
            for lab, e, f in zip(labels, entropy.tolist(), first.tolist(), strict=True)]


@dataclass
class Sparse:
    """The kept cells as rows: row_ptr (H*T_q + 1,), indices and values (nnz,), kept mass (H, T_q)."""

    row_ptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    kept_mass: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.indices.size)


def sparsify(m: MapData, top_k: int | None, threshold: float | None) -> Sparse:
    """Keep the top_k largest visible weights of each row, or those >= threshold (keys ascending in a row)."""
    w = m.weights
    if top_k is not None:
        scores = w.masked_fill(~m.visible, -1.0)  # masked cells rank last and are never kept
        values, idx = scores.topk(min(top_k, w.shape[-1]), dim=-1)
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, idx, values >= 0)
    else:
        keep = (w >= (threshold or 0.0)) & m.visible
    counts = keep.sum(-1).reshape(-1)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return Sparse(row_ptr.numpy(), keep.nonzero()[:, 2].numpy(), w[keep].numpy(), (w * keep).sum(-1).numpy())


# --- encodings -----------------------------------------------------------------------------------------------------


def encode_array(a: np.ndarray, dtype: str) -> dict[str, Any]:
    """Row-major little-endian bytes of `a` as `dtype`, base64."""
    raw = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return {"dtype": dtype, "shape": list(a.shape), "byteorder": "little", "data": base64.b64encode(raw).decode()}


def decode_array(enc: dict[str, Any]) -> np.ndarray:
    """The inverse of encode_array (what a client does)."""
    dt = np.dtype(enc["dtype"]).newbyteorder("<")
    return np.frombuffer(base64.b64decode(enc["data"]), dtype=dt).reshape(enc["shape"])


def json_rows(m: MapData, precision: int) -> list[list[list[float | None]]]:
    """Dense weights rounded, with masked (causal) cells as null."""
    rows: list[list[list[float | None]]] = m.weights.double().numpy().round(precision).tolist()
    if m.causal:
        for head in rows:
            for i, row in enumerate(head):
                start = m.q_start + i + 1
                row[start:] = [None] * (len(row) - start)
    return rows


def mask_text(m: MapData) -> str | None:
    if not m.causal:
        return None
    return (f"causal: cell (h, i, j) is masked (not attendable; 0 in data) where key j > query position "
            f"{m.q_start} + i")


def sparse_fields(s: Sparse, m: MapData, encoding: str, precision: int) -> dict[str, Any]:
    h, t_q = m.weights.shape[:2]
    out: dict[str, Any] = {"kept_mass": s.kept_mass.astype(np.float64).round(6).tolist(),
                           "kept_mass_min": round(float(s.kept_mass.min()), 6),
                           "kept_mass_mean": round(float(s.kept_mass.mean()), 6)}
    if encoding == "base64":
        index_dtype = "uint16" if m.weights.shape[-1] < 2**16 else "int32"
        out |= {"row_ptr": encode_array(s.row_ptr, "int32"), "indices_data": encode_array(s.indices, index_dtype),
                "values_data": encode_array(s.values, "float16")}
        return out
    ptr, idx, val = s.row_ptr.tolist(), s.indices.tolist(), s.values.astype(np.float64).round(precision).tolist()
    rows = [(idx[ptr[r]:ptr[r + 1]], val[ptr[r]:ptr[r + 1]]) for r in range(h * t_q)]
    out["indices"] = [[rows[a * t_q + i][0] for i in range(t_q)] for a in range(h)]
    out["values"] = [[rows[a * t_q + i][1] for i in range(t_q)] for a in range(h)]
    return out


# --- tokens ------------------------------------------------------------------------------------------------------


def token_views(tok: Tokenizer, ids: list[int], spans: list[tuple[int, int] | None],
                generated_from: int) -> list[dict[str, Any]]:
    """id, text, character span and flags of each token; spans[i] is None for specials and unknown spans."""
    specials = tok.special_ids
    return [{"id": i, "text": tok.token_text(i), "start": sp[0] if sp else None, "end": sp[1] if sp else None,
             "special": i in specials, "generated": n >= generated_from} for n, (i, sp) in enumerate(zip(ids, spans,
                                                                                                    strict=True))]


def generated_spans(tok: Tokenizer, ids: list[int], base: int) -> list[tuple[int, int] | None]:
    """Spans of generated tokens in base + decode(ids): each token covers what it adds to the decoded text."""
    ends = [base + len(tok.decode(ids[: n + 1])) for n in range(len(ids))]
    starts = [base, *ends[:-1]]
    return [(s, max(s, e)) for s, e in zip(starts, ends, strict=True)]


# --- a picture -----------------------------------------------------------------------------------------------------

PNG_MAX_GRID = 24


def render_png(maps: list[MapData], labels: dict[str, list[str]]) -> bytes:
    """One heatmap with token labels, or a (kind, layer) x head grid of small ones; masked cells are grey."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = [(m, h) for m in maps for h in range(m.weights.shape[0])]
    cols = max(m.weights.shape[0] for m in maps)
    if len(maps) > PNG_MAX_GRID or cols > PNG_MAX_GRID:
        raise SelectionError(f"a png shows at most {PNG_MAX_GRID} maps x {PNG_MAX_GRID} heads; select fewer "
                             "layers or heads, or aggregate", "format")
    single = len(cells) == 1
    fig = Figure(figsize=(7.5, 6.5) if single else (1.7 * cols + 0.6, 1.7 * len(maps) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(maps), cols, squeeze=False)
    image = None
    cmap = colormaps["viridis"].with_extremes(bad="#e4e4e4")  # masked (causal) cells
    for r, m in enumerate(maps):
        for c in range(cols):
            ax = axes[r][c]
            if c >= m.weights.shape[0]:
                ax.axis("off")
                continue
            shown = np.ma.masked_where(~m.visible.numpy(), m.weights[c].numpy())
            top = max(float(m.weights[c].max()), 1e-6)  # each map on its own scale: structure over magnitude
            image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
            head = f"head {m.heads[c]}" if m.aggregation == "none" else f"{m.aggregation} of heads"
            ax.set_title(f"{m.kind} · layer {m.layer} · {head}" if single else
                         f"{m.kind.split('_')[0]} L{m.layer} · {head.replace('head ', 'H')}", fontsize=10 if single
                         else 7)
            ax.set_xticks([])
            ax.set_yticks([])
    if single and image is not None:
        m = maps[0]
        q_labels = labels[AXES[m.kind][0]][m.q_start: m.q_start + m.weights.shape[1]]
        k_labels = labels[AXES[m.kind][1]]
        ax = axes[0][0]
        if len(k_labels) <= 80:
            ax.set_xticks(range(len(k_labels)), [repr(t)[1:-1] for t in k_labels], rotation=90, fontsize=7)
            ax.set_yticks(range(len(q_labels)), [repr(t)[1:-1] for t in q_labels], fontsize=7)
        ax.set_xlabel(f"keys ({AXES[m.kind][1]})")
        ax.set_ylabel(f"queries ({AXES[m.kind][0]})")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
