"""Network Slimming: the L1 term on the BN scales, the global |gamma| ranking, groups without BN."""

from __future__ import annotations

import torch
from torch import nn

import prunekit as pk
from nets import cbr
from prunekit import methods
from prunekit.methods.slimming import _ScaleL1, penalised_scales, slimming_scores
from prunekit.recover import TrainConfig


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(cbr(3, 6), cbr(6, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        for bn in (net[0][1], net[1][1]):
            bn.weight.copy_(torch.randn(bn.num_features))
    return net


def test_l1_term_and_its_subgradient_by_hand() -> None:
    """``lambda * sum |gamma|`` over both prunable groups' BN scales, and its gradient
    ``lambda * sign(gamma)``."""
    net = _net()
    graph = pk.trace(net, torch.randn(1, 3, 8, 8), ignore=["4"])
    groups = [g for g in graph.groups if g.n_prunable > 0]
    scales = penalised_scales(net, groups)
    assert sorted(len(pos) for _, pos in scales) == [4, 6]
    term = _ScaleL1(scales, 1e-2).extra_loss(net, (torch.zeros(1), torch.zeros(1)))
    g0, g1 = net[0][1].weight, net[1][1].weight
    assert torch.allclose(term, 1e-2 * (g0.abs().sum() + g1.abs().sum()))
    term.backward()
    torch.testing.assert_close(g0.grad, 1e-2 * g0.detach().sign())
    torch.testing.assert_close(g1.grad, 1e-2 * g1.detach().sign())


def test_global_gamma_ranking_and_groups_without_bn() -> None:
    """No training (lr 0, no penalty): the channels with the smallest |gamma| of all BN groups
    go first; a BN-less group (linear -> linear) is ranked by l2 rescaled to the mean |gamma|
    and named in the info."""
    net = _net()
    x = torch.randn(1, 3, 8, 8)
    frozen = TrainConfig(epochs=1, lr=0.0, momentum=0.0, weight_decay=0.0, schedule="constant", tensorboard=False)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)))]
    res = methods.get("slimming")(net, x, loader=data, train_config=frozen, sparsity=0.0, ratio=0.3, ignore=["4"])
    gammas = torch.cat([net[0][1].weight.detach().abs(), net[1][1].weight.detach().abs()])
    removed_by_hand = set(torch.argsort(gammas)[:3].tolist())  # floor(0.3 * 10) = 3 lowest of all 10
    kept0 = set(res.plan.keep["0.0.weight"][0])
    kept1 = set(res.plan.keep.get("1.0.weight", {0: list(range(4))})[0])
    removed = {c for c in range(6) if c not in kept0} | {6 + c for c in range(4) if c not in kept1}
    assert removed == removed_by_hand
    assert res.info["criterion_fallbacks"] == {} and res.info["finetune"] is None

    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    graph = pk.trace(mlp, torch.randn(1, 4))
    groups = [g for g in graph.groups if g.n_prunable > 0]
    scores, fallbacks = slimming_scores(mlp, groups)
    assert list(fallbacks) == [groups[0].name] and "l2" in fallbacks[groups[0].name]
    # l2 of a channel: its rows of the first layer (weight and bias) and column of the second
    l2 = (mlp[0].weight.detach().double().pow(2).sum(1) + mlp[0].bias.detach().double() ** 2
          + mlp[2].weight.detach().double().pow(2).sum(0)).sqrt().numpy()
    got = scores[groups[0].index]
    assert got.argsort().tolist() == l2.argsort().tolist()
    assert abs(got.mean() - 1.0) < 1e-9  # no BN channel to take the scale from: mean 1
