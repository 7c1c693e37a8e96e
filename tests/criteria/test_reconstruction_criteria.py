"""Compensation-aware and functionality criteria against brute-force numpy (the LASSO
criterion is in test_lasso_exact.py, CaP's greedy order in test_cap_greedy.py)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import prunekit as pk
from prunekit import criteria


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(40, 5, generator=g), None) for _ in range(2)]
    graph = pk.trace(model, torch.randn(1, 5), ignore=["2"])
    group = [g for g in graph.groups if g.name == "0"][0]
    with torch.no_grad():
        h = torch.cat([model[1](model[0](x)) for x, _ in batches]).double().numpy()
    return model, group, batches, h


def test_cap_first_removal_is_the_cheapest_after_compensation() -> None:
    """The first channel of the greedy order is the one whose removal, after a brute-force
    least-squares refit of the rest (plus a constant), loses least; its score is that loss."""
    model, group, batches, h = _setup()
    scores = criteria.score_groups(model, [group], "cap", loader=batches)[0]
    w = model[2].weight.detach().double().numpy()
    y = h @ w.T
    brute = []
    for c in range(8):
        rest = [i for i in range(8) if i != c]
        a = np.hstack([h[:, rest], np.ones((len(h), 1))])
        sol = np.linalg.lstsq(a, y, rcond=None)[0]
        brute.append(((a @ sol - y) ** 2).sum(1).mean())
    assert np.argmin(scores) == np.argmin(brute)
    np.testing.assert_allclose(scores.min(), min(brute), rtol=1e-3, atol=1e-8)


def test_functionality_removes_duplicates_first() -> None:
    from prunekit.criteria.functionality import redundancy_order

    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 50))
    feats = np.stack([base[0], 3 * base[0] + 0.01 * rng.normal(size=50), base[1], base[2], base[3]])
    order = np.argsort(redundancy_order(feats))
    assert order[0] == 0  # the weaker of the near-duplicate pair goes first


def test_functionality_on_a_net_with_duplicated_filters() -> None:
    """Filter 2 is filter 0 scaled by 1.5: same function, so filter 0 (weaker) is redundant,
    although its magnitude is not the lowest."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with torch.no_grad():
        model[0].weight[2] = 1.5 * model[0].weight[0]
        model[0].bias[2] = 1.5 * model[0].bias[0]
        model[0].weight[1] *= 0.1  # the weakest by magnitude, but unique (and alive)
        model[0].bias[1] = 0.3
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 6, 6, generator=g), None)]
    graph = pk.trace(model, torch.randn(1, 3, 6, 6))
    group = [gr for gr in graph.groups if gr.name == "0"][0]
    func = criteria.score_groups(model, [group], "functionality", loader=batches)[0]
    assert np.argmin(func) == 0
    assert np.argmin(criteria.score_groups(model, [group], "l1_out")[0]) == 1
