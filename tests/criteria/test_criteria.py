"""Criteria against hand-computed values on a tiny net; the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import criteria


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5], [3.0, 0.0]]).view(3, 2, 1, 1))
            self.bn.weight.copy_(torch.tensor([0.1, -4.0, 1.0]))
            self.bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]]))

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture()
def tiny():
    model = Tiny().eval()
    graph = pk.trace(model, torch.randn(1, 2, 4, 4))
    group = [g for g in graph.groups if g.name == "conv"][0]
    return model, group


def test_l1_sums_every_slice_the_channel_owns(tiny) -> None:
    model, group = tiny
    # channel c: |conv row c| + |bn gamma c| + |bn beta c| + |fc column c|
    expected = np.array([1 + 2 + 0.1 + 0 + 1 + 1, 0.5 + 0.5 + 4 + 1 + 0 + 1, 3 + 0 + 1 + 1 + 2 + 0])
    np.testing.assert_allclose(criteria.get("l1")(model, group), expected)


def test_l2_is_the_group_norm(tiny) -> None:
    model, group = tiny
    expected = np.sqrt([1 + 4 + 0.01 + 0 + 1 + 1, 0.25 + 0.25 + 16 + 1 + 0 + 1, 9 + 0 + 1 + 1 + 4 + 0])
    np.testing.assert_allclose(criteria.get("l2")(model, group), expected)


def test_l1_out_is_the_filter_norm(tiny) -> None:
    model, group = tiny
    np.testing.assert_allclose(criteria.get("l1_out")(model, group), [3.0, 1.0, 3.0])


def test_bn_is_abs_gamma(tiny) -> None:
    model, group = tiny
    np.testing.assert_allclose(criteria.get("bn")(model, group), [0.1, 4.0, 1.0])


def test_random_is_reproducible(tiny) -> None:
    model, group = tiny
    a = criteria.get("random")(model, group, seed=3)
    assert np.array_equal(a, criteria.get("random")(model, group, seed=3))
    assert not np.array_equal(a, criteria.get("random")(model, group, seed=4))


def test_lowest_scores_are_removed(tiny) -> None:
    model, _ = tiny
    small = pk.prune(model, torch.randn(1, 2, 4, 4), ratio=0.34, criterion="bn")  # removes 1 of 3
    torch.testing.assert_close(small.bn.weight.data, torch.tensor([-4.0, 1.0]))


def test_registry_accepts_user_criteria_and_rejects_unknown(tiny) -> None:
    model, group = tiny

    @criteria.register("test_first_wins")
    def first(model, group, **ctx):
        return np.arange(group.size, 0, -1, dtype=float)

    try:
        assert "test_first_wins" in criteria.list_criteria("test_*")
        small = pk.prune(model, torch.randn(1, 2, 4, 4), ratio=0.34, criterion="test_first_wins")
        torch.testing.assert_close(small.bn.weight.data, torch.tensor([0.1, -4.0]))
        with pytest.raises(ValueError, match="already registered"):
            criteria.register("test_first_wins")(first)
    finally:
        criteria._REGISTRY.pop("test_first_wins")
    with pytest.raises(KeyError, match="unknown criterion 'nope'"):
        criteria.get("nope")


@pytest.mark.parametrize("name", criteria.list_criteria())
def test_every_registered_criterion_scores_every_group(name: str) -> None:
    from nets import Residual

    model = Residual()
    graph = pk.trace(model, torch.randn(1, 3, 8, 8))
    scores = criteria.score_groups(model, graph.groups, name)
    assert [len(s) for s in scores] == [g.size for g in graph.groups]
    assert all(np.isfinite(s).all() for s in scores)
