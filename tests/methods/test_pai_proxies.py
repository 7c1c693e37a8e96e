"""Architecture-level proxies of pruning at initialisation against hand-computed values."""

from __future__ import annotations

import math

import torch
from torch import nn

from prunekit.criteria.init import path_norm
from prunekit.methods.pai import architecture_scores


def _two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))


def test_the_path_norm_is_the_sum_over_paths_of_the_weight_magnitudes() -> None:
    model = _two_layers()
    w1, w2 = model[0].weight.detach().double().abs(), model[2].weight.detach().double().abs()
    paths = sum(float(w2[o, h] * w1[h, i]) for o in range(2) for h in range(4) for i in range(3))
    assert math.isclose(path_norm(model, (5, 3)), math.log(paths), rel_tol=1e-12)
    assert model[0].weight.min() < 0  # the model itself is left signed


def test_architecture_scores_match_euler_and_a_hand_snip() -> None:
    model = _two_layers()
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    s = architecture_scores(model, [(x, y)])
    # SynFlow: R is homogeneous of degree 2 in the weights, so sum w dR/dw = 2R (Euler).
    assert math.isclose(s["synflow"], math.log10(2 * math.exp(s["pathnorm"])), rel_tol=1e-9)
    # SNIP: sum |w * dL/dw| with the gradient of the mean cross-entropy, by autograd here.
    w1, w2 = (model[0].weight.detach().clone().requires_grad_(), model[2].weight.detach().clone().requires_grad_())
    loss = nn.functional.cross_entropy(torch.relu(x @ w1.T) @ w2.T, y)
    g1, g2 = torch.autograd.grad(loss, [w1, w2])
    assert math.isclose(s["snip"], float((w1 * g1).abs().sum() + (w2 * g2).abs().sum()), rel_tol=1e-5)
    assert all(s[f"{k}_seconds"] >= 0 for k in ("snip", "grasp", "synflow", "pathnorm"))
