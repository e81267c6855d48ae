"""PNG rendering of maps: one labelled heatmap, or a (kind, layer) x head grid. matplotlib is imported lazily."""

from __future__ import annotations

import io

import numpy as np

from service.inspection.maps import MapData
from service.inspection.selection import AXES, SelectionError

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
