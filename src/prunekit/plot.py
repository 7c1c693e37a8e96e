"""Accuracy-versus-FLOPs plots of the models in a run (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

from prunekit.persist import atomic_write

__all__ = ["plot_accuracy_vs_flops"]


def plot_accuracy_vs_flops(points: Sequence[dict[str, Any]], path: str | os.PathLike[str], *,
                           title: str = "accuracy vs FLOPs", metric: str = "top1") -> str:
    """Draw one marker per model at (FLOPs, accuracy) and write the PNG to ``path`` atomically.

    Each point is a dict with ``label``, ``flops`` and ``metric`` (a fraction, drawn in %).
    Points are joined in the given order (e.g. original -> pruned -> fine-tuned) so the
    pruning step and the recovery show as arrows. Uses a bare ``Figure`` with the Agg canvas,
    so it neither needs a display nor touches pyplot's global state. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [p["flops"] / 1e6 for p in points]
    ys = [100.0 * p[metric] for p in points]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "color": "0.6"})
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange"]
    for i, (p, x, y) in enumerate(zip(points, xs, ys)):
        ax.scatter([x], [y], s=60, color=colors[i % len(colors)], zorder=3, label=f"{p['label']}: {y:.1f}%")
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel(f"test {metric} accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.set_xlim(0, max(xs) * 1.15 if xs else 1)
    lo = min(ys) if ys else 0.0
    ax.set_ylim(max(0.0, lo - 5.0), 100.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())
    return str(path)
