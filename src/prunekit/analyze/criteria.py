"""Criteria analyser: do pruning criteria agree, can they separate channels, are the weights Gaussian?

Reproduces the three observations of Huang et al., "Rethinking the Pruning Criteria for
Convolutional Neural Network" (NeurIPS 2021) on any model prunekit can trace:

1. **Similarity.** Popular criteria (L1, L2, FPGM, BN scale, ...) rank the filters of a layer
   almost identically: their Spearman and Kendall rank correlations are close to 1.
2. **Applicability.** In wide layers the scores of a criterion crowd together, so the
   ranking among many channels rests on tiny differences.
3. **Distribution.** The weights of trained layers look roughly Gaussian, which is the
   assumption under which criteria 1 become provably equivalent.

:func:`criteria_report` measures all three per channel group and returns a
:class:`CriteriaReport`; :func:`write_report` saves it as ``criteria_report.json``,
``criteria_report.md`` and ``criteria_heatmap.png``.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from prunekit.graph.dependency import ChannelGroup

# scipy.stats and torch are imported inside the functions that use them, so that building
# the CLI parser (which reads this module's constants) stays fast.

__all__ = [
    "DATA_DRIVEN_DEFAULT",
    "DATA_FREE_CRITERIA",
    "CriteriaReport",
    "Distinguishability",
    "GroupAnalysis",
    "LayerNormality",
    "criteria_report",
    "distinguishability",
    "rank_correlations",
    "weight_normality",
    "write_report",
]

DATA_FREE_CRITERIA: tuple[str, ...] = ("l1", "l2", "l1_out", "l2_out", "fpgm", "bn")
"""Criteria analysed by default (they need only the weights)."""

DATA_DRIVEN_DEFAULT: tuple[str, ...] = ("taylor", "taylor_act", "activation", "apoz")
"""Data-driven criteria added by default when a loader is given: the one-pass statistics
(the reconstruction criteria such as ``lasso`` are much slower; request them by name)."""

MIN_CHANNELS = 4
"""Groups with fewer prunable channels are skipped: rank correlations of 2-3 values say nothing."""

CLOSE_TOLERANCE = 0.01
"""Two scores closer than this fraction of the group's score range count as "too close to separate"."""

SHAPIRO_MAX = 5000
"""Shapiro-Wilk runs on at most this many sampled weights (scipy's p-value is exact only up to 5000)."""


def _f(v: Any) -> float:
    """A plain Python float (NaN stays NaN)."""
    return float(v)


@dataclass(frozen=True)
class Distinguishability:
    """How well one criterion separates the channels of one group (its prunable channels only).

    - ``cv``: coefficient of variation, ``std(s) / |mean(s)|`` (population std); NaN when the
      mean is 0. Small values mean every channel gets about the same score.
    - ``min_gap``: the smallest gap between neighbouring sorted scores divided by the score
      range ``max(s) - min(s)``; 0 when two scores tie or all are equal. It shrinks as
      channels get crowded: the ranking then hinges on differences of that size.
    - ``close_fraction``: the fraction of channels whose score lies within
      ``CLOSE_TOLERANCE`` (1%) of the score range of some *other* channel's score; 1.0 when
      all scores are equal. High values mean many channels cannot be told apart. It grows
      with the number of channels even for well-spread scores (``n`` uniformly random scores
      give about ``1 - (1 - 2 * tolerance) ** (n - 1)``: 0.26 for 16, 0.72 for 64 channels),
      so compare groups of the same width or against that baseline.
    """

    cv: float
    min_gap: float
    close_fraction: float

    def to_dict(self) -> dict[str, float | None]:
        """The three measures as a JSON-ready dict (NaN becomes None)."""
        return {"cv": _clean(self.cv), "min_gap": _clean(self.min_gap), "close_fraction": _clean(self.close_fraction)}


@dataclass(frozen=True)
class LayerNormality:
    """Normality tests of the filter weights of one producing layer (its prunable filters pooled).

    ``shapiro_p`` is the Shapiro-Wilk p-value on at most ``SHAPIRO_MAX`` weights sampled
    without replacement (seeded); ``normaltest_p`` is D'Agostino-Pearson's K^2 p-value on all
    the weights (None below 8 weights, where the test is undefined). ``looks_gaussian`` is
    True when *neither* test rejects normality at ``alpha``.

    With thousands of weights both tests detect even tiny departures from normality, so a
    layer that is Gaussian for every practical purpose can still be rejected; ``skew`` and
    ``excess_kurtosis`` (0 for a Gaussian, -2 for random signs, -1.2 for a uniform, positive
    for heavy tails) show how large the departure actually is.
    """

    layer: str
    group: str
    n_weights: int
    n_sampled: int
    shapiro_p: float
    normaltest_p: float | None
    skew: float
    excess_kurtosis: float
    looks_gaussian: bool
    alpha: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        """The test results as a JSON-ready dict."""
        return {"layer": self.layer, "group": self.group, "n_weights": self.n_weights, "n_sampled": self.n_sampled,
                "shapiro_p": _clean(self.shapiro_p), "normaltest_p": _clean(self.normaltest_p),
                "skew": _clean(self.skew), "excess_kurtosis": _clean(self.excess_kurtosis),
                "looks_gaussian": self.looks_gaussian, "alpha": self.alpha}


@dataclass(frozen=True)
class GroupAnalysis:
    """Everything measured on one channel group.

    ``spearman[i][j]`` / ``kendall[i][j]`` are the rank correlations (scipy's ``spearmanr``
    and ``kendalltau``, tau-b) between criteria ``i`` and ``j`` of the report over the
    group's prunable channels; NaN where a criterion gives every channel the same score.
    ``scores`` maps each criterion to its scores of those channels (``channels`` are their
    group-local indices).
    """

    index: int
    name: str
    size: int
    channels: tuple[int, ...]
    criteria: tuple[str, ...]
    spearman: tuple[tuple[float, ...], ...]
    kendall: tuple[tuple[float, ...], ...]
    distinguishability: dict[str, Distinguishability]
    layers: tuple[LayerNormality, ...]
    scores: dict[str, np.ndarray] = field(repr=False, compare=False)

    @property
    def n_channels(self) -> int:
        """Number of channels analysed (the group's prunable channels)."""
        return len(self.channels)

    def to_dict(self, *, include_scores: bool = True) -> dict[str, Any]:
        """JSON-ready dict of the group's measurements (scores included unless told otherwise)."""
        out: dict[str, Any] = {
            "index": self.index, "name": self.name, "size": self.size, "n_channels": self.n_channels,
            "spearman": _matrix(self.spearman), "kendall": _matrix(self.kendall),
            "distinguishability": {c: d.to_dict() for c, d in self.distinguishability.items()},
            "layers": [m.to_dict() for m in self.layers],
        }
        if include_scores:
            out["channels"] = list(self.channels)
            out["scores"] = {c: [_clean(v) for v in s] for c, s in self.scores.items()}
        return out


@dataclass(frozen=True)
class CriteriaReport:
    """Result of :func:`criteria_report`: per-group rows plus a summary over groups.

    Summary fields: ``mean_spearman`` / ``mean_kendall`` (criteria x criteria, the mean over
    the groups where the correlation is defined; ``pair_counts`` says over how many),
    ``mean_distinguishability`` (per criterion, each measure averaged over groups),
    ``gaussian_fraction`` (fraction of analysed layers that look Gaussian; None without
    layers). ``skipped`` lists ``(group name, reason)`` for groups left out.
    """

    criteria: tuple[str, ...]
    groups: tuple[GroupAnalysis, ...]
    mean_spearman: tuple[tuple[float, ...], ...]
    mean_kendall: tuple[tuple[float, ...], ...]
    pair_counts: tuple[tuple[int, ...], ...]
    mean_distinguishability: dict[str, Distinguishability]
    gaussian_fraction: float | None
    n_layers: int
    skipped: tuple[tuple[str, str], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def correlation(self, a: str, b: str, kind: str = "spearman") -> float:
        """Mean rank correlation between criteria ``a`` and ``b`` (``kind``: 'spearman' or 'kendall')."""
        if kind not in ("spearman", "kendall"):
            raise ValueError(f"kind must be 'spearman' or 'kendall', got {kind!r}")
        mat = self.mean_spearman if kind == "spearman" else self.mean_kendall
        return mat[self.criteria.index(a)][self.criteria.index(b)]

    def to_dict(self, *, include_scores: bool = True) -> dict[str, Any]:
        """JSON-ready dict (NaN written as null) of the summary, the per-group rows and the metadata."""
        return {
            "format": "prunekit.criteria_report/1",
            "criteria": list(self.criteria),
            "summary": {
                "groups": len(self.groups),
                "layers": self.n_layers,
                "mean_spearman": _matrix(self.mean_spearman),
                "mean_kendall": _matrix(self.mean_kendall),
                "pair_counts": [list(r) for r in self.pair_counts],
                "mean_distinguishability": {c: d.to_dict() for c, d in self.mean_distinguishability.items()},
                "gaussian_fraction": _clean(self.gaussian_fraction),
            },
            "groups": [g.to_dict(include_scores=include_scores) for g in self.groups],
            "skipped": [{"group": n, "reason": r} for n, r in self.skipped],
            "meta": _jsonable(self.meta),
        }

    def to_markdown(self) -> str:
        """Readable Markdown: the mean correlation matrices, distinguishability, per-group and per-layer tables."""
        c = self.criteria
        alpha = self.meta.get("alpha", 0.05)
        lines = ["# Pruning criteria analysis", ""]
        what = self.meta.get("model", "model")
        lines.append(f"Model: `{what}`; criteria: {', '.join(f'`{x}`' for x in c)}; "
                     f"{len(self.groups)} channel groups analysed (>= {self.meta.get('min_channels', MIN_CHANNELS)} "
                     f"prunable channels), {len(self.skipped)} skipped; {self.n_layers} producing layers tested.")
        if self.meta.get("data"):
            lines.append(f"Calibration data for the data-driven criteria: `{self.meta['data']}`, "
                         f"{self.meta.get('batches')} batch(es).")
        lines.append("")
        for title, mat in (("Mean Spearman rank correlation", self.mean_spearman),
                           ("Mean Kendall rank correlation (tau-b)", self.mean_kendall)):
            lines += [f"## {title}", "", "Mean over groups of the per-group correlation over prunable channels.", ""]
            lines += _md_table([""] + list(c), [[f"`{a}`"] + [_fmt(v) for v in row] for a, row in zip(c, mat)])
            lines.append("")
        lines += ["## Distinguishability (mean over groups)", "",
                  ("`cv`: std/|mean| of the scores. `min gap`: smallest gap between neighbouring sorted scores / "
                   "score range. `close`: fraction of channels within 1% of the score range of another channel "
                   "(uniformly spread scores give about 1 - 0.98^(n-1): 0.26 for 16 channels, 0.72 for 64)."), ""]
        lines += _md_table(["criterion", "cv", "min gap", "close"],
                           [[f"`{k}`", _fmt(d.cv), _fmt(d.min_gap, 4), _fmt(d.close_fraction)]
                            for k, d in self.mean_distinguishability.items()])
        lines += ["", "## Per group", "",
                  "Spearman/Kendall: mean over all criteria pairs (min in brackets); close: per criterion.", ""]
        rows = []
        for g in self.groups:
            sp, kd = _off_diagonal(g.spearman), _off_diagonal(g.kendall)
            rows.append([g.name, str(g.n_channels), _mean_min(sp), _mean_min(kd)]
                        + [_fmt(g.distinguishability[k].close_fraction) for k in c])
        lines += _md_table(["group", "channels", "Spearman", "Kendall"] + [f"close `{k}`" for k in c], rows)
        frac = "n/a" if self.gaussian_fraction is None else f"{100 * self.gaussian_fraction:.0f}%"
        lines += ["", "## Weight distribution per producing layer", "",
                  (f"{frac} of {self.n_layers} layers look Gaussian (neither Shapiro-Wilk on <= {SHAPIRO_MAX} sampled "
                   f"weights nor D'Agostino's K^2 on all weights rejects at alpha {alpha:g}). With thousands of "
                   "weights the tests flag even tiny departures, so read skew and excess kurtosis (0 for a Gaussian) "
                   "too."), ""]
        lines += _md_table(["layer", "weights", "Shapiro p", "K^2 p", "skew", "excess kurtosis", "Gaussian?"],
                           [[f"`{m.layer}`", str(m.n_weights), _fmt_p(m.shapiro_p), _fmt_p(m.normaltest_p),
                             _fmt(m.skew), _fmt(m.excess_kurtosis), "yes" if m.looks_gaussian else "no"]
                            for g in self.groups for m in g.layers])
        if self.skipped:
            lines += ["", "## Skipped groups", ""]
            lines += [f"- `{n}`: {r}" for n, r in self.skipped]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- measures


def rank_correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Spearman rho and Kendall tau-b of two score vectors (scipy); NaN for a constant vector."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan  # ranks of a constant are all tied: no correlation is defined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(a, b).statistic
        tau = stats.kendalltau(a, b).statistic
    return _f(rho), _f(tau)


def distinguishability(scores: np.ndarray, tolerance: float = CLOSE_TOLERANCE) -> Distinguishability:
    """Return the :class:`Distinguishability` of one score vector (see that class for the definitions).

    ``tolerance`` is the fraction of the score range within which two scores count as close.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) < 2:
        return Distinguishability(math.nan, math.nan, math.nan)
    mean = s.mean()
    cv = _f(s.std() / abs(mean)) if mean != 0 else math.nan
    span = s[-1] - s[0]
    if span == 0:
        return Distinguishability(cv, 0.0, 1.0)
    gaps = np.diff(s)
    # In sorted order a channel's nearest other score is one of its two neighbours.
    nearest = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf])
    return Distinguishability(cv, _f(gaps.min() / span), _f(np.mean(nearest <= tolerance * span)))


def weight_normality(weights: np.ndarray, *, layer: str = "", group: str = "", alpha: float = 0.05,
                     seed: int = 0, max_shapiro: int = SHAPIRO_MAX) -> LayerNormality:
    """Test whether the pooled ``weights`` of a layer look Gaussian; returns a :class:`LayerNormality`.

    Shapiro-Wilk runs on at most ``max_shapiro`` weights drawn without replacement by a
    generator seeded with ``seed``; D'Agostino-Pearson's normaltest runs on all weights.
    With many weights both tests are very sensitive (they reject departures far too small to
    matter for pruning), so the skew and excess kurtosis are reported as well.
    """
    from scipy import stats

    w = np.asarray(weights, dtype=np.float64).ravel()
    n = len(w)
    if n < 3:
        raise ValueError(f"layer '{layer}': {n} weights are too few for a normality test (need >= 3)")
    sample = w if n <= max_shapiro else np.random.default_rng(seed).choice(w, size=max_shapiro, replace=False)
    with warnings.catch_warnings():
        # scipy warns about small samples (kurtosistest < 20) and constant input; we report what it returns.
        warnings.simplefilter("ignore")
        shapiro_p = _f(stats.shapiro(sample).pvalue) if np.ptp(sample) > 0 else 0.0
        normal_p = _f(stats.normaltest(w).pvalue) if n >= 8 and np.ptp(w) > 0 else None
        skew = _f(stats.skew(w))
        kurt = _f(stats.kurtosis(w, fisher=True))
    p_values = [p for p in (shapiro_p, normal_p) if p is not None]
    gaussian = all(not math.isnan(p) and p >= alpha for p in p_values)
    return LayerNormality(layer, group, n, len(sample), shapiro_p, normal_p, skew, kurt, gaussian, alpha)


def _producer_weights(model: nn.Module, group: ChannelGroup) -> list[tuple[str, np.ndarray]]:
    """``(tensor name, weights of the group's prunable filters)`` for every filter weight
    (conv/linear, by their handler) that produces the group's channels (members with role 'out')."""
    from prunekit.criteria import tensor_of
    from prunekit.handlers import handler_for

    out = []
    for m in group.members:
        mod_name, _, leaf = m.tensor.rpartition(".")
        if m.role != "out" or leaf != "weight":
            continue
        mod = model.get_submodule(mod_name) if mod_name else model
        handler = handler_for(mod)
        if handler is None or not handler.has_filters:
            continue
        chan = np.asarray(m.channel)
        keep = np.zeros(len(chan), dtype=bool)
        ok = chan >= 0
        keep[ok] = group.prunable[chan[ok]]
        if not keep.any():
            continue
        t = tensor_of(model, m.tensor).detach().cpu().double().movedim(m.dim, 0)
        out.append((m.tensor, t[np.flatnonzero(keep)].numpy().ravel()))
    return out


# ---------------------------------------------------------------------------------- report


def criteria_report(model: nn.Module, example_inputs: Any, *, criteria: Sequence[str] | None = None,
                    loader: Iterable[Any] | None = None, batches: int = 8,
                    ignore: Iterable[nn.Module | str] | None = None, graph: Any = None,
                    alpha: float = 0.05, seed: int = 0, min_channels: int = MIN_CHANNELS) -> CriteriaReport:
    """Score every channel group of ``model`` with several criteria and compare them; returns a :class:`CriteriaReport`.

    ``criteria`` defaults to the data-free :data:`DATA_FREE_CRITERIA` (``l1, l2, l1_out, l2_out, fpgm,
    bn``) plus, when ``loader`` (an iterable of ``(inputs, targets)`` batches) is given, the
    data-driven :data:`DATA_DRIVEN_DEFAULT` (``taylor, taylor_act, activation, apoz``); any
    criterion in :data:`prunekit.criteria.DATA_CRITERIA` uses ``batches`` batches of
    ``loader``. The model is traced once with ``ignore`` (or ``graph`` is used as is). Groups with fewer than ``min_channels`` prunable channels
    are skipped; only the prunable channels of the others are compared.

    Per group: Spearman and Kendall correlations for every pair of criteria, the
    :class:`Distinguishability` of each criterion, and a :class:`LayerNormality` test (at
    ``alpha``, Shapiro sample seeded with ``seed``) for each conv/linear weight producing
    the group. Unknown criterion names raise ``KeyError``; a data-driven criterion without
    ``loader`` raises :class:`prunekit.PruningError`. The model's weights are not changed.
    """
    import prunekit as pk
    from prunekit.criteria import DATA_CRITERIA, get, score_groups
    from prunekit.errors import PruningError

    if criteria is None:
        names = list(DATA_FREE_CRITERIA) + (list(DATA_DRIVEN_DEFAULT) if loader is not None else [])
    else:
        names = list(dict.fromkeys(criteria))  # keep order, drop repeats
    if not names:
        raise ValueError("criteria: need at least one criterion")
    for name in names:
        get(name)  # fail before tracing: unknown names raise KeyError listing the registered ones
    needs_data = [n for n in names if n in DATA_CRITERIA]
    if needs_data and loader is None:
        raise PruningError(f"criteria {', '.join(needs_data)} need calibration data: pass loader=")
    if min_channels < 2:
        raise ValueError(f"min_channels={min_channels}: must be >= 2 (rank correlations need two channels)")
    if graph is None:
        graph = pk.trace(model, example_inputs, ignore=ignore)

    kept, skipped = [], []
    for g in graph.groups:
        if g.n_prunable >= min_channels:
            kept.append(g)
        else:
            skipped.append((g.name, f"{g.n_prunable} prunable channel(s) of {g.size} (< {min_channels})"))

    all_scores = {name: score_groups(model, kept, name, loader=loader, batches=batches) for name in names}
    rows = []
    for i, g in enumerate(kept):
        mask = np.asarray(g.prunable, dtype=bool)
        scores = {name: all_scores[name][i][mask] for name in names}
        k = len(names)
        sp = np.eye(k)
        kd = np.eye(k)
        for a in range(k):
            for b in range(a + 1, k):
                rho, tau = rank_correlations(scores[names[a]], scores[names[b]])
                sp[a, b] = sp[b, a] = rho
                kd[a, b] = kd[b, a] = tau
        for a in range(k):
            if np.ptp(scores[names[a]]) == 0:
                sp[a, a] = kd[a, a] = math.nan  # a constant ranking does not even correlate with itself
        layers = tuple(weight_normality(w, layer=t, group=g.name, alpha=alpha, seed=seed)
                       for t, w in _producer_weights(model, g) if w.size >= 3)
        rows.append(GroupAnalysis(g.index, g.name, g.size, tuple(int(c) for c in np.flatnonzero(mask)), tuple(names),
                                  _tuple(sp), _tuple(kd), {n: distinguishability(s) for n, s in scores.items()},
                                  layers, scores))

    mean_sp, counts = _nanmean([r.spearman for r in rows], len(names))
    mean_kd, _ = _nanmean([r.kendall for r in rows], len(names))
    mean_dist = {}
    for n in names:
        ds = [r.distinguishability[n] for r in rows]
        mean_dist[n] = Distinguishability(*(_nanmean_1d([getattr(d, f) for d in ds])
                                            for f in ("cv", "min_gap", "close_fraction")))
    layers = [m for r in rows for m in r.layers]
    frac = sum(m.looks_gaussian for m in layers) / len(layers) if layers else None
    meta = {"model": type(model).__name__, "criteria": names, "batches": batches if loader is not None else None,
            "alpha": alpha, "seed": seed, "min_channels": min_channels, "close_tolerance": CLOSE_TOLERANCE,
            "shapiro_max": SHAPIRO_MAX, "data_driven": [n for n in names if n in DATA_CRITERIA]}
    return CriteriaReport(tuple(names), tuple(rows), _tuple(mean_sp), _tuple(mean_kd),
                          tuple(tuple(int(v) for v in row) for row in counts), mean_dist, frac, len(layers),
                          tuple(skipped), meta)


def write_report(report: CriteriaReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``criteria_report.json``, ``criteria_report.md`` and ``criteria_heatmap.png`` into ``out_dir``.

    Every file is written atomically (:func:`prunekit.persist.atomic_write`); the directory
    is created if needed. Returns ``{"json": path, "markdown": path, "heatmap": path}``.
    """
    from prunekit.persist import atomic_write

    out = Path(out_dir)
    paths = {"json": out / "criteria_report.json", "markdown": out / "criteria_report.md",
             "heatmap": out / "criteria_heatmap.png"}
    atomic_write(paths["json"], json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")
    atomic_write(paths["markdown"], report.to_markdown())
    atomic_write(paths["heatmap"], _heatmap_png(report))
    return paths


def _heatmap_png(report: CriteriaReport) -> bytes:
    """PNG bytes of the mean Spearman and Kendall matrices side by side, values annotated."""
    # A bare Figure on the Agg canvas: no display needed and pyplot's global state is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = report.criteria
    k = len(names)
    side = max(3.2, 0.62 * k + 1.6)
    fig = Figure(figsize=(2 * side + 1.2, side + 0.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    image = None
    for ax, title, mat in ((axes[0], "mean Spearman", report.mean_spearman), (axes[1], "mean Kendall", report.mean_kendall)):
        m = np.array(mat, dtype=np.float64).reshape(k, k)
        image = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_title(f"{title} ({len(report.groups)} groups)", fontsize=10)
        for i in range(k):
            for j in range(k):
                v = m[i, j]
                text = "n/a" if math.isnan(v) else f"{v:.2f}"
                color = "white" if not math.isnan(v) and abs(v) > 0.6 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7 if k > 6 else 8, color=color)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="rank correlation")
    fig.suptitle(f"Pruning criteria agreement: {report.meta.get('model', '')}", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------------------- helpers


def _tuple(m: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(_f(v) for v in row) for row in np.asarray(m))


def _nanmean(mats: list[tuple[tuple[float, ...], ...]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise mean over matrices ignoring NaN, and how many were not NaN per entry."""
    if not mats:
        return np.full((k, k), math.nan), np.zeros((k, k), dtype=int)
    stack = np.array(mats, dtype=np.float64).reshape(len(mats), k, k)
    valid = ~np.isnan(stack)
    counts = valid.sum(0)
    total = np.where(valid, stack, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, total / np.maximum(counts, 1), math.nan), counts


def _nanmean_1d(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return _f(np.mean(ok)) if ok else math.nan


def _clean(v: Any) -> Any:
    """A JSON-safe number: NaN/inf become None."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _matrix(m: tuple[tuple[float, ...], ...]) -> list[list[float | None]]:
    return [[_clean(v) for v in row] for row in m]


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return _clean(v)
    if isinstance(v, np.integer):
        return int(v)
    return v if v is None or isinstance(v, (str, int, bool)) else str(v)


def _off_diagonal(m: tuple[tuple[float, ...], ...]) -> list[float]:
    k = len(m)
    return [m[i][j] for i in range(k) for j in range(i + 1, k) if not math.isnan(m[i][j])]


def _mean_min(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.3f})" if values else "n/a"


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out
