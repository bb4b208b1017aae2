"""Figures and HTML fragments for the inspect report: attention heatmaps, per-head grids, token colouring.

All return HTML strings (images as PNG data URIs; token text escaped), built on ``attnlab.htmlkit``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import torch

from ..htmlkit import fig_to_data_uri, img, plt

__all__ = ["heatmap", "head_grid", "line_plot", "token_colors"]


def _short(tokens: Sequence[str], width: int = 10) -> list[str]:
    return [t.replace("\n", "\\n")[:width] for t in tokens]


def heatmap(matrix: torch.Tensor, *, title: str, xlabels: Sequence[str] | None = None,
            ylabels: Sequence[str] | None = None, xlabel: str = "", ylabel: str = "", cmap: str = "viridis",
            size: float = 5.0) -> str:
    """One 2-D matrix as an image (token labels shown when there are at most 48)."""
    m = matrix.detach().float().cpu()
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(size * 1.15, size))
    im = ax.imshow(m.numpy(), cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if xlabels is not None and len(xlabels) <= 48:
        ax.set_xticks(range(len(xlabels)), _short(xlabels), rotation=90, fontsize=6)
    if ylabels is not None and len(ylabels) <= 48:
        ax.set_yticks(range(len(ylabels)), _short(ylabels), fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return img(fig_to_data_uri(fig), title)


def head_grid(maps: torch.Tensor, *, title: str, row_label: str = "layer", col_label: str = "head",
              row_names: Sequence[int] | None = None, max_rows: int = 8, cmap: str = "viridis",
              gamma: float = 0.5) -> str:
    """A grid of small heatmaps: ``maps (R, C, N, M)`` (e.g. layers x heads x queries x keys). ``row_names``
    labels the rows (e.g. the layer numbers the maps came from); colours use a power scale with ``gamma`` (0.5 =
    square root) so that weak structure next to a dominant diagonal or sink stays visible."""
    from matplotlib.colors import PowerNorm

    R, C = maps.shape[:2]
    names = list(row_names) if row_names is not None else list(range(R))
    if len(names) != R:
        raise ValueError(f"head_grid: expected {R} row names, received {len(names)}")
    rows = list(range(R)) if R <= max_rows else sorted({round(i * (R - 1) / (max_rows - 1)) for i in range(max_rows)})
    pyplot = plt()
    fig, axes = pyplot.subplots(len(rows), C, figsize=(1.3 * C, 1.3 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for c in range(C):
            ax = axes[i][c]
            ax.imshow(maps[r, c].detach().float().cpu().numpy(), cmap=cmap, aspect="auto", interpolation="nearest",
                      norm=PowerNorm(gamma, vmin=0.0))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{col_label} {c}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{row_label} {names[r]}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return img(fig_to_data_uri(fig), title)


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
              logx: bool = False, logy: bool = False) -> str:
    """Several named lines over one x axis."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.6))
    for name, ys in series.items():
        ax.plot(list(xs)[: len(ys)], [float("nan") if y is None else y for y in ys], marker=".", label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return img(fig_to_data_uri(fig), title)


def token_colors(tokens: Sequence[str], scores: Sequence[float] | torch.Tensor, *, title: str) -> str:
    """Tokens as inline spans whose background is the score (min-max scaled; red = high), text escaped."""
    s = [float(x) for x in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    if len(s) != len(tokens):
        raise ValueError(f"token_colors: expected one score per token ({len(tokens)}), received {len(s)}")
    finite = [x for x in s if math.isfinite(x)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = (hi - lo) or 1.0
    out = [f"<div class=tokens><p class=note>{html.escape(title)} (min {lo:.3g}, max {hi:.3g})</p><p>"]
    for t, x in zip(tokens, s):
        a = 0.0 if not math.isfinite(x) else (x - lo) / span
        out.append(f'<span style="background:rgba(220,40,40,{a:.2f})" title="{x:.4g}">{html.escape(t)}</span>')
    out.append("</p></div>")
    return "".join(out)
