"""SNIP, GraSP and SynFlow channel scores against hand computations on a 2-layer MLP."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import prunekit as pk
from prunekit.criteria import score_groups


def _mlp() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    return net, torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])


def _hidden_scores(name: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    graph = pk.trace(net, x)
    (group,) = [g for g in graph.groups if g.size == 3]
    idx = [g.index for g in graph.groups].index(group.index)
    return score_groups(net, list(graph.groups), name, loader=[(x, y)], batches=1)[idx]


def _backprop(net: nn.Sequential, x: np.ndarray, y: np.ndarray):
    """Gradients of the mean cross-entropy by hand (numpy), and what the forward computed."""
    w1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    w2, b2 = net[2].weight.detach().numpy(), net[2].bias.detach().numpy()
    a = x @ w1.T + b1
    h = np.maximum(a, 0)
    z = h @ w2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(2)[y]) / len(x)
    gw2, gb2 = dz.T @ h, dz.sum(0)
    da = (dz @ w2) * (a > 0)
    gw1, gb1 = da.T @ x, da.sum(0)
    return (w1, b1, w2), (gw1, gb1, gw2)


def test_snip_is_the_summed_connection_sensitivity_of_each_hidden_unit() -> None:
    net, x, y = _mlp()
    (w1, b1, w2), (gw1, gb1, gw2) = _backprop(net, x.numpy(), y.numpy())
    # Unit c owns row c of W1, b1[c] and column c of W2.
    expected = np.abs(w1 * gw1).sum(1) + np.abs(b1 * gb1) + np.abs(w2 * gw2).sum(0)
    np.testing.assert_allclose(_hidden_scores("snip", net, x, y), expected, rtol=1e-8)


def test_grasp_matches_a_finite_difference_hessian_gradient_product() -> None:
    net, x, y = _mlp()
    params = list(net.parameters())

    def grad_at(delta: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, d in zip(params, delta):
                p.add_(d)
        loss = nn.functional.cross_entropy(net(x), y)
        g = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, d in zip(params, delta):
                p.sub_(d)
        return [t.detach() for t in g]

    g0 = grad_at([torch.zeros_like(p) for p in params])
    eps = 1e-5
    plus, minus = grad_at([eps * g for g in g0]), grad_at([-eps * g for g in g0])
    hg = [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
    w1, b1, w2 = (params[i].detach() for i in (0, 1, 2))
    expected = ((w1 * hg[0]).sum(1) + b1 * hg[1] + (w2 * hg[2]).sum(0)).numpy()
    np.testing.assert_allclose(_hidden_scores("grasp", net, x, y), expected, rtol=1e-4, atol=1e-9)


def test_synflow_matches_the_path_norm_by_hand_and_leaves_the_model_alone() -> None:
    net, x, y = _mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    w1, b1 = net[0].weight.detach().abs().numpy(), net[0].bias.detach().abs().numpy()
    w2 = net[2].weight.detach().abs().numpy()
    # With |weights| and an all-ones input every unit is active: R = sum_k sum_c |W2|[k,c] h_c + ...,
    # h_c = sum_j |W1|[c,j] + |b1|[c]. dR/dW1[c,j] = sum_k |W2|[k,c]; dR/db1[c] = the same; dR/dW2[k,c] = h_c.
    h = w1.sum(1) + b1
    col = w2.sum(0)
    expected = (w1 * col[:, None]).sum(1) + b1 * col + (w2 * h[None, :]).sum(0)
    np.testing.assert_allclose(_hidden_scores("synflow", net, x * 7.0, y), expected, rtol=1e-10)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
