"""PNG rendering of maps: one labelled heatmap, or a (kind, layer) x head grid with token labels and one colour
bar. matplotlib is imported lazily (only PNG requests pay for it)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from service.inspection.maps import MapData
from service.inspection.selection import AXES, SelectionError

PNG_MAX_GRID = 24
MAX_LABELS = 48  # past this many tokens an axis labels every n-th one


def _ticks(ax: Any, labels: list[str], axis: str, fontsize: float) -> None:
    """Token labels on one axis, thinned to at most MAX_LABELS."""
    every = max(1, -(-len(labels) // MAX_LABELS))
    pos = list(range(0, len(labels), every))
    text = [repr(labels[i])[1:-1] for i in pos]
    if axis == "x":
        ax.set_xticks(pos, text, rotation=90, fontsize=fontsize)
    else:
        ax.set_yticks(pos, text, fontsize=fontsize)


def render_png(maps: list[MapData], labels: dict[str, list[str]]) -> bytes:
    """One heatmap with token labels, or a (kind, layer) x head grid of small ones; masked cells are grey.

    In a grid each map is drawn on its own scale (weight / the map's largest weight), so one colour bar serves them
    all and the structure of a head shows even where another head's weights are larger; one map shows its weights."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(m.weights.shape[0] for m in maps)
    if len(maps) > PNG_MAX_GRID or cols > PNG_MAX_GRID:
        raise SelectionError(f"a png shows at most {PNG_MAX_GRID} maps x {PNG_MAX_GRID} heads; select fewer "
                             "layers or heads, or aggregate", "format")
    single = len(maps) == 1 and cols == 1
    longest = max(len(labels[AXES[m.kind][1]]) for m in maps)
    fontsize = 7 if single else max(3.5, min(6.0, 160 / max(longest, 1)))
    cell = 2.2 if longest > 12 else 1.8
    fig = Figure(figsize=(7.5, 6.5) if single else (cell * cols + 1.6, cell * len(maps) + 0.8), dpi=100,
                 layout="constrained")  # room for the token labels and the colour bar
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(maps), cols, squeeze=False)
    image = None
    cmap = colormaps["viridis"].with_extremes(bad="#e4e4e4")  # masked (causal) cells
    for r, m in enumerate(maps):
        q_axis, k_axis = AXES[m.kind]
        q_labels = labels[q_axis][m.q_start: m.q_start + m.weights.shape[1]]
        last_of_kind = r == len(maps) - 1 or maps[r + 1].kind != m.kind  # keys differ between kinds
        for c in range(cols):
            ax = axes[r][c]
            if c >= m.weights.shape[0]:
                ax.axis("off")
                continue
            w = m.weights[c].numpy()
            top = max(float(w.max()), 1e-6)
            shown = np.ma.masked_where(~m.visible.numpy(), w if single else w / top)
            image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=top if single else 1.0, aspect="auto",
                              interpolation="nearest")
            head = f"head {m.heads[c]}" if m.aggregation == "none" else f"{m.aggregation} of heads"
            ax.set_title(f"{m.kind} · layer {m.layer} · {head}" if single else
                         f"{m.kind.split('_')[0]} L{m.layer} · {head.replace('head ', 'H')}", fontsize=10 if single
                         else 7)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                _ticks(ax, q_labels, "y", fontsize)
            if last_of_kind:
                _ticks(ax, labels[k_axis], "x", fontsize)
        axes[r][0].set_ylabel(f"queries ({q_axis})", fontsize=7 if not single else 10)
        if last_of_kind:
            axes[r][0].set_xlabel(f"keys ({k_axis})", fontsize=7 if not single else 10)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.046 if single else 0.03, pad=0.02)
        bar.set_label("attention weight" if single else "weight / the map's largest weight", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
