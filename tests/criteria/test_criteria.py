"""Criteria against hand-computed values on a tiny net; the registry."""

from __future__ import annotations

import copy

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


def test_l2_out_is_the_filter_l2_norm(tiny) -> None:
    model, group = tiny
    np.testing.assert_allclose(criteria.get("l2_out")(model, group), np.sqrt([1 + 4, 0.25 + 0.25, 9 + 0]))


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
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    scores = criteria.score_groups(model, graph.groups, name, loader=loader)
    assert [len(s) for s in scores] == [g.size for g in graph.groups]
    assert all(np.isfinite(s).all() for s in scores)


def test_fpgm_is_the_summed_distance_between_filters(tiny) -> None:
    model, group = tiny
    rows = np.array([[1.0, -2.0], [0.5, 0.5], [3.0, 0.0]])  # conv filters (the group's producer)
    expected = [sum(np.linalg.norm(rows[i] - rows[j]) for j in range(3)) for i in range(3)]
    np.testing.assert_allclose(criteria.get("fpgm")(model, group), expected)


def _batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 2, (5,), generator=g)) for _ in range(n)]


def test_weight_taylor_is_the_squared_directional_derivative(tiny) -> None:
    """Oracle: d/da of the loss when every parameter slice of channel c is scaled by a,
    at a=1 (a finite difference), which equals sum(w * grad) over those slices."""
    model, group = tiny
    batches = _batches()
    got = criteria.score_groups(model, [group], "taylor", loader=batches)[0]
    eps = 1e-3
    expected = np.zeros(3)
    for c in range(3):
        for x, y in batches:
            losses = []
            for a in (1 + eps, 1 - eps):
                m = copy.deepcopy(model)
                with torch.no_grad():
                    m.conv.weight[c] *= a
                    m.bn.weight[c] *= a
                    m.bn.bias[c] *= a
                    m.fc.weight[:, c] *= a
                losses.append(torch.nn.functional.cross_entropy(m(x), y).item())
            expected[c] += ((losses[0] - losses[1]) / (2 * eps)) ** 2
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-9)


def _pooled(model: Tiny, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(model.bn(model.conv(x))).mean((2, 3))  # the fc's input: where channels are consumed


def test_activation_and_apoz_fall_back_to_the_consumer_input(tiny) -> None:
    """Tiny's ReLU is a function call, not a module, so there is no activation output to hook:
    the statistics are read at the fc's input (after the mean), and the fallback is reported."""
    model, group = tiny
    batches = _batches()
    fallbacks: dict[str, str] = {}
    criteria.score_groups(model, [group], "apoz", loader=batches, fallbacks=fallbacks)
    assert fallbacks["conv"].startswith("apoz: activation statistics read at the consumer input")
    with torch.no_grad():
        acts = [_pooled(model, x) for x, _ in batches]
    mean_abs = sum(a.abs().mean(0) for a in acts).numpy()
    nonzero = sum((a != 0).double().mean(0) for a in acts).numpy()
    np.testing.assert_allclose(criteria.score_groups(model, [group], "activation", loader=batches)[0], mean_abs, rtol=1e-5)
    np.testing.assert_allclose(criteria.score_groups(model, [group], "apoz", loader=batches)[0], nonzero, rtol=1e-5)


def test_activation_taylor_is_activation_times_gradient(tiny) -> None:
    model, group = tiny
    batches = _batches()
    expected = np.zeros(3)
    for x, y in batches:
        a = _pooled(model, x).detach().requires_grad_(True)
        torch.nn.functional.cross_entropy(model.fc(a), y).backward()
        expected += (a * a.grad).abs().mean(0).detach().numpy()
    got = criteria.score_groups(model, [group], "taylor_act", loader=batches)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_data_criteria_need_a_loader(tiny) -> None:
    model, group = tiny
    with pytest.raises(pk.PruningError, match="criterion 'taylor' needs calibration data"):
        criteria.score_groups(model, [group], "taylor")


def test_member_reductions(tiny) -> None:
    """Per member |slice|: conv row, bn gamma, bn beta, fc column (see the l1 test)."""
    model, group = tiny
    per = np.array([[3.0, 0.1, 0.0, 2.0], [1.0, 4.0, 1.0, 1.0], [3.0, 1.0, 1.0, 2.0]])
    l1 = criteria.get("l1")
    np.testing.assert_allclose(l1(model, group, reduction="mean"), per.mean(1))
    np.testing.assert_allclose(l1(model, group, reduction="max"), per.max(1))
    with pytest.raises(ValueError, match="reduction='median'"):
        l1(model, group, reduction="median")
