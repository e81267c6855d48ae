"""The maths of the returned maps: aggregation over heads, rollout through layers, per-head statistics and
sparsification of rows. Pure torch on (H, T_q, T_k) tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.inspection.selection import CAUSAL, Selection


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
    """The selected maps from the captured weights: rows cut to the query range, heads aggregated or rolled out."""
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
