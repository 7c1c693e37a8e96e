"""Least-squares reconstruction / compensation against numpy solutions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.recover.reconstruct import reconstruct, solve_least_squares
from prunekit.features import Moments


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def _batches(shape: tuple[int, ...], n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), None) for _ in range(n)]


def test_solver_matches_numpy_lstsq() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)), rng.normal(size=(200, 3))
    mom = Moments.empty(5, 3)
    mom.add(torch.from_numpy(x), torch.from_numpy(y))
    w, b = solve_least_squares(mom.xx, mom.xy, ridge=0.0)
    sol = np.linalg.lstsq(np.hstack([x, np.ones((200, 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(w.numpy(), sol[:-1].T, atol=1e-9)
    np.testing.assert_allclose(b.numpy(), sol[-1], atol=1e-9)


@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_compensated_layer_is_the_least_squares_fit(mode: str) -> None:
    model = _mlp()
    batches = _batches((50, 6))
    small, plan = pk.prune(model, torch.randn(1, 6), ratio=0.375, ignore=["2"], return_plan=True)
    kept = plan.keep["2.weight"][1]
    assert len(kept) == 5
    assert reconstruct(small, model, plan, batches, mode=mode, positions=None) == ["2"]
    with torch.no_grad():
        h = torch.cat([model[1](model[0](x)) for x, _ in batches]).double().numpy()
        y = torch.cat([model(x) for x, _ in batches]).double().numpy()
    sol = np.linalg.lstsq(np.hstack([h[:, kept], np.ones((len(h), 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(small[2].weight.detach().double().numpy(), sol[:-1].T, atol=1e-4)
    np.testing.assert_allclose(small[2].bias.detach().double().numpy(), sol[-1], atol=1e-4)


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                        nn.Conv2d(12, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 5))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 8, 8))
    return net.eval()


@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_reconstruction_beats_plain_removal(mode: str) -> None:
    """The consumer conv (no bias: its offset goes into the next BatchNorm) reproduces the
    original response clearly better than after plain removal, on held-out data."""
    model = _conv_net()
    small, plan = pk.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, ignore=["8"], return_plan=True)
    fixed = copy.deepcopy(small)
    names = reconstruct(fixed, model, plan, _batches((16, 3, 8, 8)), mode=mode)
    assert "3" in names
    x = torch.randn(32, 3, 8, 8)

    def err(m: nn.Module) -> float:
        with torch.no_grad():
            return float(((m[:5](x) - model[:5](x)[:, plan.keep["3.weight"][0]]) ** 2).mean())
    assert err(fixed) < 0.75 * err(small)
    assert not torch.equal(fixed[4].running_mean, small[4].running_mean)  # the offset was folded


def test_sequential_corrects_accumulated_error() -> None:
    model = _conv_net()
    small, plan = pk.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, ignore=["8"], return_plan=True)
    x = torch.randn(64, 3, 8, 8)
    errs = {}
    for mode in ("oneshot", "sequential"):
        m = copy.deepcopy(small)
        reconstruct(m, model, plan, _batches((16, 3, 8, 8)), mode=mode)
        with torch.no_grad():
            errs[mode] = float(((m(x) - model(x)) ** 2).mean())
    assert errs["sequential"] <= errs["oneshot"] * 1.01


@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_attention_out_proj_is_left_alone(mode: str) -> None:
    """nn.MultiheadAttention uses out_proj's weight without calling it: out_proj lost its
    inputs (heads) but has no input to fit to, so it keeps its pruned weights; the MLP's
    second layer, which lost inputs too, is rewritten."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=4, hidden_dim=16, mlp_dim=32,
                              num_classes=3).eval()
    small, plan = pk.prune(model, torch.randn(1, 3, 16, 16), ratio=0.5, return_plan=True)
    out_proj = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    assert plan.keep[f"{out_proj}.weight"][1]  # it did lose inputs
    before = small.get_submodule(out_proj).weight.detach().clone()
    names = reconstruct(small, model, plan, _batches((4, 3, 16, 16)), mode=mode)
    assert "encoder.layers.encoder_layer_0.mlp.3" in names and out_proj not in names
    assert torch.equal(small.get_submodule(out_proj).weight, before)
