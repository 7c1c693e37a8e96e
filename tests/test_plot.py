"""prunekit.plot: what draw_pareto puts on the axes, read back from matplotlib's artists."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from prunekit.plot import GROUP_COLORS, draw_pareto, plot_pareto  # noqa: E402

POINTS = [
    {"group": "a", "flops": 3e6, "top1": 0.80, "front_flops": False, "label": ""},
    {"group": "a", "flops": 1e6, "top1": 0.70, "front_flops": True, "label": "a1", "err": 0.01},
    {"group": "b", "flops": 2e6, "top1": 0.85, "front_flops": True, "label": ""},
    {"group": "b", "flops": 4e6, "top1": 0.84, "front_flops": False, "label": ""},
    {"flops": 5e6, "top1": 0.90, "front_flops": True, "label": "base", "reference": True},
    {"group": "b", "flops": None, "top1": 0.99, "front_flops": False},  # no cost: not drawn
]


def _axes():
    fig = Figure()
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def test_draw_pareto_groups_front_and_error_bars() -> None:
    fig, ax = _axes()
    shown = draw_pareto(ax, POINTS)
    assert shown == POINTS[:5]
    lines = {ln.get_label(): ln for ln in ax.lines if not ln.get_label().startswith("_")}
    # Each group joined in cost order (MFLOPs, %), in its colour; the front likewise, in red.
    for name, color, want in (("a", GROUP_COLORS[0], [(1, 70), (3, 80)]), ("b", GROUP_COLORS[1], [(2, 85), (4, 84)]),
                              ("Pareto front", "tab:red", [(1, 70), (2, 85), (5, 90)])):
        xs, ys = lines[name].get_data()
        np.testing.assert_allclose(np.column_stack([xs, ys]), np.array(want, dtype=float))
        assert lines[name].get_color() == color
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "Pareto front"]
    # One error bar, on a1: from 69 to 71 percent.
    bars = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    assert len(bars) == 1
    np.testing.assert_allclose(bars[0].get_segments()[0], [[1, 69], [1, 71]])
    assert sorted(t.get_text() for t in ax.texts) == ["a1", "base"]


def test_draw_pareto_nothing_measured_says_so() -> None:
    fig, ax = _axes()
    assert draw_pareto(ax, POINTS, key="latency_ms", front_key="front_latency") == []
    assert [t.get_text() for t in ax.texts] == ["not measured"]
    assert ax.get_legend() is None


def test_plot_pareto_writes_a_png(tmp_path) -> None:
    path = plot_pareto([dict(p, latency_ms=None) for p in POINTS], tmp_path / "p.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
