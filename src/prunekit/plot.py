"""Accuracy-versus-FLOPs plots of the models in a run (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

from prunekit.persist import atomic_write

__all__ = ["GROUP_COLORS", "draw_pareto", "plot_accuracy_vs_flops", "plot_gate_trajectory", "plot_pareto",
           "write_png"]


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
    return write_png(fig, path)


def plot_gate_trajectory(trajectory: Sequence[dict[str, Any]], path: str | os.PathLike[str], *,
                         title: str = "keep fraction per group") -> str:
    """Draw a training method's per-epoch trajectory and write the PNG to ``path`` atomically.

    Each entry has ``epoch`` and ``keep`` (group name -> kept fraction) and either
    ``expected`` with ``target`` (the expected budgeted fraction of soft masks against the
    budget) or ``flops_above_threshold`` (Network Slimming). Left: one line per group; right:
    the expected fraction against the target. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    epochs = [t["epoch"] for t in trajectory]
    names = list(trajectory[0]["keep"]) if trajectory else []
    for name in names:
        left.plot(epochs, [t["keep"].get(name, float("nan")) for t in trajectory], lw=1, alpha=0.8)
    left.set_xlabel("epoch")
    left.set_ylabel("kept fraction (mean gate value)")
    left.set_ylim(-0.02, 1.02)
    left.set_title(f"{title} ({len(names)} groups)")
    left.grid(True, alpha=0.3)
    if trajectory and "expected" in trajectory[0]:
        right.plot(epochs, [t["expected"] for t in trajectory], marker="o", label="expected")
        right.axhline(trajectory[0]["target"], color="tab:red", ls="--", label="target")
        right.set_ylabel("expected fraction of the budgeted quantity")
    elif trajectory:
        right.plot(epochs, [t.get("flops_above_threshold") for t in trajectory], marker="o",
                   label="FLOPs left after removing |gamma| < threshold")
        right.set_ylabel("fraction of FLOPs")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1.05)
    right.grid(True, alpha=0.3)
    right.legend(loc="best", fontsize=8)
    return write_png(fig, path)


GROUP_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                "tab:cyan")
"""Colours of the point groups of :func:`draw_pareto`, in order of first appearance."""


def draw_pareto(ax: Any, points: Sequence[dict[str, Any]], *, key: str = "flops", front_key: str = "front_flops",
                xlabel: str = "MFLOPs per image", metric: str = "top1") -> list[dict[str, Any]]:
    """Draw accuracy (``metric``, a fraction, drawn in %) against the cost ``key`` (``"flops"``
    is drawn in millions) on the matplotlib axes ``ax``: one marker per point that has both,
    the points with ``front_key`` set joined in cost order by a red line and ringed (the
    Pareto front, as the caller computed it). Optional point keys: ``label`` (written beside
    the marker; empty for none), ``reference`` (a grey star: the unpruned model), ``group``
    (the points of a group share a colour of :data:`GROUP_COLORS` and a legend entry and are
    joined in cost order by a thin line) and ``err`` (half-width of an interval of the
    metric, a fraction: a vertical error bar). Returns the points drawn."""
    shown = [p for p in points if p.get(key) is not None and p.get(metric) is not None]
    scale = 1e-6 if key == "flops" else 1.0
    groups = list(dict.fromkeys(p["group"] for p in shown if p.get("group") is not None))
    color = {g: GROUP_COLORS[i % len(GROUP_COLORS)] for i, g in enumerate(groups)}
    for g in groups:
        mine = sorted((p for p in shown if p.get("group") == g and not p.get("reference")), key=lambda p: p[key])
        ax.plot([p[key] * scale for p in mine], [100.0 * p[metric] for p in mine], color=color[g], lw=0.8,
                alpha=0.7, zorder=2, label=g)
    for p in shown:
        x, y = p[key] * scale, 100.0 * p[metric]
        c = "tab:gray" if p.get("reference") else color.get(p.get("group"), "tab:blue")
        if p.get("err"):
            ax.errorbar([x], [y], yerr=[100.0 * p["err"]], color=c, lw=0.8, capsize=2, zorder=3)
        ax.scatter([x], [y], s=90 if p.get("reference") else 45, marker="*" if p.get("reference") else "o",
                   color=c, zorder=3)
        if p.get("label"):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8)
    front = sorted((p for p in shown if p.get(front_key)), key=lambda p: p[key])
    if front:
        ax.plot([p[key] * scale for p in front], [100.0 * p[metric] for p in front], color="tab:red", lw=1.2,
                zorder=2, label="Pareto front")
        ax.scatter([p[key] * scale for p in front], [100.0 * p[metric] for p in front], s=140,
                   facecolors="none", edgecolors="tab:red", zorder=4)
    if front or groups:
        ax.legend(loc="best", fontsize=8)
    if not shown:
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {metric} accuracy (%)")
    ax.grid(True, alpha=0.3)
    return shown


def plot_pareto(points: Sequence[dict[str, Any]], path: str | os.PathLike[str], *,
                title: str = "accuracy against cost", metric: str = "top1") -> str:
    """Draw accuracy against measured latency (left) and against FLOPs (right), one marker per
    model, the Pareto front of each panel joined by a line and ringed, and write the PNG to
    ``path`` atomically.

    Each point has ``label``, ``flops``, ``metric`` (a fraction, drawn in %), ``latency_ms``
    (None when not measured: the point is left out of the left panel) and ``front_latency`` /
    ``front_flops`` (whether it is on that panel's front, as the caller computed it);
    ``reference=True`` draws it as a star (the unpruned model); the other keys of
    :func:`draw_pareto` apply too. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    panels = [(fig.add_subplot(1, 2, 1), "latency_ms", "front_latency", "latency at batch 1 (ms)"),
              (fig.add_subplot(1, 2, 2), "flops", "front_flops", "MFLOPs per image")]
    for ax, key, front_key, xlabel in panels:
        draw_pareto(ax, points, key=key, front_key=front_key, xlabel=xlabel, metric=metric)
    panels[0][0].set_title(f"{title}: latency")
    panels[1][0].set_title(f"{title}: FLOPs")
    return write_png(fig, path)


def write_png(fig: Any, path: str | os.PathLike[str]) -> str:
    """Lay out ``fig``, write it as a PNG to ``path`` atomically and return the path."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())
    return str(path)
