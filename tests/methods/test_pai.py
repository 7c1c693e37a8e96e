"""Pruning at initialisation: the proxy decides the widths; a unit no path reaches goes first."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit import methods
from prunekit.errors import PruningError
from prunekit.measure import count_flops


def _mlp_with_a_dead_unit() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[2].weight[:, 5] = 0.0  # hidden unit 5 of the first layer reaches nothing
    return net


@pytest.mark.parametrize("proxy", ["snip", "synflow"])  # GraSP scores can be negative: 0 is not its lowest
def test_the_unit_no_path_reaches_is_removed(proxy: str) -> None:
    net, x = _mlp_with_a_dead_unit(), torch.randn(16, 6)
    before = copy.deepcopy(net.state_dict())
    res = methods.get("pai")(net, x[:1], loader=[(x, torch.randint(0, 3, (16,)))], proxy=proxy,
                             ratio=1 / 16, ignore=["4"])
    # One channel of the 16 goes, ranked across both hidden layers: exactly the unit with score 0.
    assert res.plan.keep["0.weight"] == {0: [0, 1, 2, 3, 4, 6, 7]} and res.plan.keep["2.weight"] == {1: [0, 1, 2, 3, 4, 6, 7]}
    assert res.info["proxy"] == proxy and res.info["score_seconds"] >= 0
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_budget_and_training_from_scratch() -> None:
    net, x = _mlp_with_a_dead_unit(), torch.randn(32, 6)
    y = (x[:, 0] > 0).long()
    res = methods.get("pai")(net, x[:1], loader=[(x[:16], y[:16]), (x[16:], y[16:])], epochs=2, target_flops=0.6,
                             ignore=["4"])
    kept = count_flops(res.model, x[:1]) / count_flops(net, x[:1])
    assert 0.5 < kept <= 0.6 and res.info["train"]["epochs"] == 2
    with pytest.raises(PruningError, match="proxy='nope'"):
        methods.get("pai")(net, x[:1], loader=[(x, y)], proxy="nope", ratio=0.5)
