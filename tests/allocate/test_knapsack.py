"""allocation="knapsack": channels that buy the most of the budget per importance lost, on
recorded (hand-made) latency tables, against a brute-force search and the ratio allocation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import criteria
from prunekit.errors import PruningError
from prunekit.measure import count_flops
from prunekit.measure.latency_table import LatencyTable, LayerTiming

F = (0.25, 0.5, 0.75, 1.0)
X = torch.randn(1, 3, 8, 8)


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


# Each layer's time is linear in its output width only; layer "2" dominates.
SLOPES = {"0": 0.2, "2": 10.0, "4": 0.3, "8": 0.0}


def _table(model: nn.Module) -> LatencyTable:
    layers = {}
    for name, m in model.named_modules():
        if name in SLOPES:
            cin = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            cout = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            grid = np.tile(np.asarray(F) * SLOPES[name] + 0.01, (len(F), 1))  # rows: input fraction
            layers[name] = LayerTiming(cin, cout, grid)
    return LatencyTable(layers, F, model_ms=20.0, device="cpu")


def _groups_scores(model: nn.Module) -> tuple[list, list[np.ndarray]]:
    graph = pk.trace(model, X, ignore=["8"])
    groups = [g for g in graph.groups if g.n_prunable]
    return groups, [np.asarray(s, float) for s in criteria.score_groups(model, groups, "l2")]


def _removed_importance(groups: list, scores: list[np.ndarray], counts: tuple[int, ...]) -> float:
    total = 0.0
    for g, s, n in zip(groups, scores, counts):
        norm = s / s[g.prunable].mean()
        total += float(np.sort(norm[g.prunable])[:n].sum())
    return total


def _counts(model: nn.Module, small: nn.Module) -> tuple[int, ...]:
    names = ["0", "2", "4"]
    return tuple(model.get_submodule(n).out_channels - small.get_submodule(n).out_channels for n in names)


def test_knapsack_matches_brute_force_on_a_separable_table() -> None:
    model = _chain()
    table = _table(model)
    base = table.estimate(model)
    target = 0.6
    small = pk.prune(model, X, ignore=["8"], target_latency=target, latency_table=table, allocation="knapsack")
    assert table.estimate(small) <= target * base + 1e-9
    groups, scores = _groups_scores(model)
    # Brute force over every count triple: the least importance removed within the budget.
    slope = {name: SLOPES[name] for name in ("0", "2", "4")}
    full = sum(SLOPES[n] + 0.01 for n in SLOPES)

    def latency(counts: tuple[int, ...]) -> float:
        now = sum(slope[n] * (8 - c) / 8 + 0.01 for n, c in zip(("0", "2", "4"), counts)) + SLOPES["8"] + 0.01
        return 20.0 * now / full

    feasible = [c for c in itertools.product(range(8), repeat=3) if latency(c) <= target * base + 1e-9]
    best = min(_removed_importance(groups, scores, c) for c in feasible)
    got = _removed_importance(groups, scores, _counts(model, small))
    # Greedy by value per cost is optimal on a separable linear cost up to its last chunk.
    biggest = max(float((s / s[g.prunable].mean()).max()) for g, s in zip(groups, scores))
    assert best <= got <= best + biggest
    assert _counts(model, small)[1] >= 3  # the expensive layer pays for the budget


def test_knapsack_keeps_more_importance_than_the_ratio_allocation() -> None:
    model = _chain()
    table = _table(model)
    groups, scores = _groups_scores(model)
    kw = dict(ignore=["8"], target_latency=0.6, latency_table=table)
    knap = pk.prune(model, X, allocation="knapsack", **kw)
    ratio = pk.prune(model, X, **kw)
    base = table.estimate(model)
    assert table.estimate(knap) <= 0.6 * base + 1e-9 and table.estimate(ratio) <= 0.6 * base + 1e-9
    assert _removed_importance(groups, scores, _counts(model, knap)) < \
        _removed_importance(groups, scores, _counts(model, ratio))


@pytest.mark.parametrize("round_to", [1, 4])
def test_knapsack_flops_budget_lands_on_target(round_to: int) -> None:
    from prunekit.zoo.models import create_model

    model = create_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    small, plan = pk.prune(model, x, ignore=["fc"], target_flops=0.5, allocation="knapsack", round_to=round_to,
                           return_plan=True)
    kept = count_flops(small, x) / count_flops(model, x)
    assert 0.47 <= kept <= 0.5, kept
    assert plan.meta["allocation"] == "knapsack"
    if round_to > 1:
        widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
        assert all(w % round_to == 0 for w in widths), widths


def test_knapsack_needs_a_budget() -> None:
    with pytest.raises(PruningError, match="allocation='knapsack' needs a budget"):
        pk.PruneConfig(ratio=0.5, allocation="knapsack")
    with pytest.raises(PruningError, match="allocation='greedy'"):
        pk.PruneConfig(target_flops=0.5, allocation="greedy")
    from prunekit.recipe import Recipe, RecipeError

    with pytest.raises(RecipeError, match="allocation"):
        Recipe(allocation="greedy").check()


def test_knapsack_unreachable_target_names_it() -> None:
    model = _chain()
    with pytest.raises(PruningError, match="target_latency=0.01 cannot be met"):
        pk.prune(model, X, ignore=["8"], target_latency=0.01, latency_table=_table(model), allocation="knapsack")
