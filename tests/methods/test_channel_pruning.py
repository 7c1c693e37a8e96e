"""He et al. 2017 layer by layer: each group's LASSO selection sees the partially pruned,
reconstructed network, checked against an independent numpy / scikit-learn re-enactment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso
from torch import nn

import prunekit as pk
from prunekit import methods
from prunekit.criteria.reconstruction import lasso_order, lasso_order_gram
from prunekit.planning import channel_plan, removed_channels
from tests.nets import TinyResNet, warmed


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def _bisected_support(design: np.ndarray, y: np.ndarray, k: int) -> list[int]:
    """sklearn's positive LASSO support with exactly ``k`` channels, the penalty bisected."""
    lo, hi = 1e-12, float(np.abs(design.T @ y).max() / len(y))
    for _ in range(200):
        alpha = (lo * hi) ** 0.5
        coef = Lasso(alpha=alpha, positive=True, fit_intercept=False, max_iter=200_000, tol=1e-14).fit(design, y).coef_
        support = np.flatnonzero(coef > 1e-12)
        if len(support) == k:
            return sorted(support.tolist())
        lo, hi = (alpha, hi) if len(support) > k else (lo, alpha)
    raise AssertionError("no penalty gives exactly k channels")


def _design(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Column c: the consumer's output entries (no bias) from input channel c alone."""
    return np.stack([(h[:, [c]] * w[:, c][None, :]).ravel() for c in range(h.shape[1])], 1)


def _oracle(model: nn.Sequential, x: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    w1, b1, w2, b2, w3 = (t.detach().numpy() for t in (model[0].weight, model[0].bias, model[2].weight,
                                                      model[2].bias, model[4].weight))
    h1 = np.maximum(x @ w1.T + b1, 0)
    s1 = _bisected_support(_design(h1, w2), (h1 @ w2.T).ravel(), k)
    # fc2 refit by least squares (with intercept) from the kept h1 to the original fc2 output.
    a = np.hstack([h1[:, s1], np.ones((len(x), 1))])
    y2 = h1 @ w2.T + b2
    sol = np.linalg.lstsq(a, y2, rcond=None)[0]
    h2_pruned = np.maximum(a @ sol, 0)
    h2 = np.maximum(y2, 0)
    s2 = _bisected_support(_design(h2_pruned, w3), (h2 @ w3.T).ravel(), k)
    return s1, s2


@pytest.mark.parametrize("seed", [0, 1, 9])
def test_layerwise_selection_matches_reenactment(seed: int) -> None:
    model = _mlp(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(96, 6, generator=gen, dtype=torch.float64)
    batches = [(x[:48], None), (x[48:], None)]
    res = methods.get("channel_pruning")(model, x[:2], loader=batches, ratio=0.5)
    s1, s2 = _oracle(model, x.numpy(), 4)
    keep = res.plan.keep
    assert keep["0.weight"][0] == s1
    assert keep["2.weight"][0] == s2
    assert res.info["order"] == ["0", "2"]


def test_layerwise_differs_from_oneshot_somewhere() -> None:
    """The re-enactment tells the two selections apart: on some seed the second group's
    LASSO support on the pruned network is not the one on the original network."""
    differs = []
    for seed in range(10):
        model = _mlp(seed)
        x = torch.randn(96, 6, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        one = methods.get("channel_pruning")(model, x[:2], loader=[(x, None)], ratio=0.5, layerwise=False)
        _, s2 = _oracle(model, x.numpy(), 4)
        differs.append(one.plan.keep["2.weight"][0] != s2)
    assert any(differs)


def test_gram_path_equals_design_path() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        design = rng.normal(size=(200, 7)) @ rng.normal(size=(7, 7))  # correlated columns
        y = design @ np.abs(rng.normal(size=7)) + 0.3 * rng.normal(size=200)
        a = lasso_order(design, y)
        b = lasso_order_gram(design.T @ design, design.T @ y, len(y))
        for k in range(1, 7):
            assert set(np.argsort(-a, kind="stable")[:k]) == set(np.argsort(-b, kind="stable")[:k])


def test_removed_channels_inverts_channel_plan() -> None:
    model = warmed(TinyResNet())
    x = torch.randn(1, 3, 16, 16)
    graph = pk.trace(model, x)
    rng = np.random.default_rng(0)
    removed = [np.sort(rng.choice(np.flatnonzero(g.prunable), size=g.n_prunable // 2, replace=False))
               if g.n_prunable > 1 else np.zeros(0, dtype=np.int64) for g in graph.groups]
    plan, _ = channel_plan(model, graph, removed)
    back = removed_channels(graph.groups, plan)
    assert [r.tolist() for r in back] == [r.tolist() for r in removed]


def test_layerwise_conv_net_reaches_the_allocated_architecture() -> None:
    model = warmed(TinyResNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batches = [(x[:8], None), (x[8:], None)]
    res = methods.get("channel_pruning")(model, x[:1], loader=batches, target_flops=0.5)
    one = methods.get("channel_pruning")(model, x[:1], loader=batches, target_flops=0.5, layerwise=False)
    assert {k: v.shape for k, v in res.model.state_dict().items()} == \
        {k: v.shape for k, v in one.model.state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched
    # The plan saved with the result rebuilds the same model from the original.
    rebuilt = pk.surgery.apply_plan(model, res.plan)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in res.model.state_dict().items()}
    with torch.no_grad():
        err = (res.model(x) - model(x)).pow(2).mean() / model(x).pow(2).mean()
    assert float(err) < 0.5  # reconstruction keeps the function close (a plain removal is far off)


def test_attention_heads_no_layer_reads_fall_back_to_l2() -> None:
    """nn.MultiheadAttention's heads are read by out_proj's weight inside one fused call (out_proj
    never runs its own forward, so no reconstruction problem exists for them): the heads removed
    are those with the smallest L2 norm over their q/k/v rows, biases and out_proj columns."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=4, hidden_dim=16, mlp_dim=32,
                              num_classes=3).eval()
    attn = model.encoder.layers[0].self_attention
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    res = methods.get("channel_pruning")(model, x[:1], loader=[(x[:4], None), (x[4:], None)], ratio=0.5)
    with torch.no_grad():
        w, b, o = attn.in_proj_weight.view(3, 4, 4, 16), attn.in_proj_bias.view(3, 4, 4), attn.out_proj.weight
        norms = (w.pow(2).sum((0, 2, 3)) + b.pow(2).sum((0, 2)) + o.view(16, 4, 4).pow(2).sum((0, 2))).sqrt()
    kept = sorted(np.argsort(norms.numpy())[2:].tolist())
    rows = [r for t in range(3) for h in kept for r in range(16 * t + 4 * h, 16 * t + 4 * h + 4)]
    assert res.plan.keep["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"][0] == rows
