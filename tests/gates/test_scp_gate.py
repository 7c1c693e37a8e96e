"""The ``scp`` gate kind: BN -> ReLU deactivation probability, relaxed Bernoulli masks, fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

import prunekit as pk
from nets import Residual, cbr
from prunekit.gates import attach_gates
from prunekit.gates.scp import ScpGate
from prunekit.methods.scp import bind_to_batchnorm

GAMMA = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.3])
BETA = torch.tensor([0.0, 0.5, -1.0, 0.3, -0.2])


def _net() -> nn.Sequential:
    """linear -> BN -> ReLU -> linear, BN with known affine parameters and unit statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).eval()
    with torch.no_grad():
        net[1].weight.copy_(GAMMA)
        net[1].bias.copy_(BETA)
    return net


def _gated(net: nn.Module, x: torch.Tensor) -> tuple[object, ScpGate]:
    graph = pk.trace(net, x[:2])
    gates = attach_gates(net, graph, kind="scp")
    bound, unbound = bind_to_batchnorm(net, graph, gates)
    assert len(bound) == 1 and not unbound
    gate = next(iter(gates.gates.values()))
    assert isinstance(gate, ScpGate) and gate.bound and not list(gate.parameters())
    return gates, gate


def test_deactivation_probability_matches_a_monte_carlo_estimate() -> None:
    """With running mean 0 and variance 1 the BN output of a standard normal input is exactly
    N(beta, gamma^2): the fraction of zeros after the ReLU estimates Phi(-beta / |gamma|)."""
    net = _net()
    x = torch.randn(4, 3)
    gates, gate = _gated(net, x)
    torch.testing.assert_close(gate.deactivation_probability().double(),
                               torch.from_numpy(norm.cdf(-BETA.numpy() / np.abs(GAMMA.numpy()))), atol=1e-6, rtol=0)
    z = torch.randn(200_000, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net[2](net[1](z))  # BN (gated: the mask is > 0, so zeros stay zeros) -> ReLU
    monte_carlo = (out == 0).double().mean(0)
    assert torch.all((monte_carlo - gate.deactivation_probability().double()).abs() < 0.01)


def test_eval_mask_is_the_keep_probability_and_fold_keeps_the_function() -> None:
    """Oracle: the original network with BN's gamma and beta scaled by Phi(beta / |gamma|)
    (the mask is non-negative, so masking before the ReLU equals masking after it)."""
    net = _net()
    x = torch.randn(16, 3)
    with torch.no_grad():
        original = net(x)
    gates, gate = _gated(net, x)
    p = torch.from_numpy(norm.cdf(BETA.numpy() / np.abs(GAMMA.numpy()))).float()
    oracle = _net()
    with torch.no_grad():
        oracle[1].weight.mul_(p)
        oracle[1].bias.mul_(p)
        want = oracle(x)
        gated = net(x)
    torch.testing.assert_close(gated, want)
    assert not torch.allclose(gated, original)
    with torch.no_grad():
        gates.fold()
        torch.testing.assert_close(net(x), gated)  # still attached, now exactly 1
        gates.detach()
        torch.testing.assert_close(net(x), gated)
    torch.testing.assert_close(net[1].weight.detach(), GAMMA * p)


def test_gates_at_one_compute_the_original() -> None:
    net = _net()
    x = torch.randn(16, 3)
    with torch.no_grad():
        want = net(x)
    gates, gate = _gated(net, x)
    gate.set_identity()
    with torch.no_grad():
        assert torch.equal(net(x), want)
    net.train()
    gate.resample()
    with torch.no_grad():
        assert torch.equal(gate.values(), torch.ones(5))


def test_training_samples_are_relaxed_bernoulli_with_the_keep_probability() -> None:
    """At a low relaxation temperature a draw is almost binary and is 1 with probability
    P(keep) = Phi(beta / |gamma|); 400 channels per (gamma, beta) pair and 50 draws give
    20,000 samples per pair (binomial error <= 0.0036)."""
    torch.manual_seed(0)
    copies = 400
    bn = nn.BatchNorm1d(5 * copies)
    with torch.no_grad():
        bn.weight.copy_(GAMMA.repeat(copies))
        bn.bias.copy_(BETA.repeat(copies))
    gate = ScpGate(5 * copies, temperature=0.01)
    gate.bind([(bn, torch.arange(5 * copies))])
    gate.train()
    draws = []
    for _ in range(50):
        gate.resample()
        draws.append(gate.values().detach())
    draws = torch.stack(draws).view(50, copies, 5)
    assert ((draws < 0.01) | (draws > 0.99)).double().mean() > 0.97
    keep = torch.from_numpy(norm.cdf(BETA.numpy() / np.abs(GAMMA.numpy())))
    assert torch.all(((draws > 0.5).double().mean((0, 1)) - keep).abs() < 0.015)
    gate.eval()
    assert torch.equal(gate.values(), gate.keep_probability())  # evaluation: the expectation


def test_groups_without_bn_relu_keep_their_own_logit() -> None:
    """nets.Residual: the two 12-channel groups are conv -> BN -> ReLU (bound); the 16-channel
    stream is a residual sum whose ReLU follows an addition (own logit, sigmoid(logit))."""
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = pk.trace(model, x, ignore=["fc"])
    gates = attach_gates(model, graph, kind="scp", init=1.5)
    bound, unbound = bind_to_batchnorm(model, graph, gates)
    sizes = {g.name: g.size for g in gates.groups}
    assert sorted(sizes[n] for n in bound) == [12, 12]
    assert [sizes[n] for n in unbound] == [16]
    free = next(gates.gate(g.index) for g in gates.groups if g.name in unbound)
    assert isinstance(free, ScpGate) and not free.bound
    torch.testing.assert_close(free.keep_probability(), torch.sigmoid(torch.full((16,), 1.5)))


def test_bind_refuses_a_layer_without_affine_parameters() -> None:
    gate = ScpGate(4)
    with pytest.raises(ValueError, match="no affine weight and bias"):
        gate.bind([(nn.BatchNorm2d(4, affine=False), torch.arange(4))])
    with pytest.raises(ValueError, match="positions of shape"):
        gate.bind([(nn.BatchNorm2d(4), torch.arange(3))])


def test_the_groups_of_a_bn_after_a_concat_are_driven_by_it() -> None:
    """A BN after a concat carries two groups; their producers reach it through the concat,
    so each group is gated at the BN alone (not a second time at its conv) and its gate reads
    its own channels of that BN: keep probability ``Phi(beta / |gamma|)`` (scipy's normal CDF)."""

    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(10)
            self.head = cbr(10, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))

    torch.manual_seed(0)
    model = Cat().eval()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 8, 8)
    graph = pk.trace(model, x, ignore=["head.0"])
    gates = attach_gates(model, graph, kind="scp")
    assert all([name for name, _, _ in gates.sites(g.index)] == ["bn"] for g in gates.groups)
    bound, unbound = bind_to_batchnorm(model, graph, gates)
    assert len(bound) == 2 and not unbound
    gamma, beta = model.bn.weight.detach().double().numpy(), model.bn.bias.detach().double().numpy()
    for g, channels in zip(gates.forward_order(), (slice(0, 4), slice(4, 10))):
        want = norm.cdf(beta[channels] / np.abs(gamma[channels]))
        np.testing.assert_allclose(gates.gate(g.index).keep_probability().detach().double().numpy(), want, rtol=1e-6)
