"""The differentiable cost model against count_flops / count_params of really pruned models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import prunekit as pk
from prunekit.allocate.cost import CostModel
from prunekit.measure import count_flops, count_params
from prunekit.zoo import resolve_model

TORCHVISION = [("resnet18", 48), ("resnet50", 48), ("mobilenet_v2", 48), ("mobilenet_v3_small", 48),
               ("mobilenet_v3_large", 48), ("efficientnet_b0", 48), ("densenet121", 48), ("convnext_tiny", 48),
               ("regnet_y_400mf", 48), ("shufflenet_v2_x0_5", 48), ("squeezenet1_1", 48), ("googlenet", 48),
               ("vit_b_16", 64)]  # swin_t also matches (checked by hand) but takes ~1 min here
ZOO = ["resnet20", "resnet56", "vgg16_bn_cifar", "mobilenetv2_cifar", "small_cnn"]


def _check(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> None:
    graph = pk.trace(model, x)
    cost = CostModel(graph, model, x)
    assert cost.base_flops == count_flops(model, x)
    assert cost.base_params == count_params(model)
    small, plan = pk.prune(model, x, ratio=ratio, criterion="random", graph=graph, return_plan=True)
    mask = cost.mask_of_plan(plan)
    assert mask.sum() < cost.n  # something was removed, so the check can fail
    flops, params = count_flops(small, x), count_params(small)
    assert float(cost.flops(mask)) == pytest.approx(flops, rel=0.01)
    assert float(cost.params(mask)) == pytest.approx(params, rel=0.01)


@pytest.mark.parametrize("name,size", TORCHVISION, ids=[n for n, _ in TORCHVISION])
def test_cost_model_matches_pruned_torchvision(name: str, size: int) -> None:
    torch.manual_seed(0)
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = getattr(torchvision.models, name)(**kwargs).eval()
    _check(model, torch.randn(1, 3, size, size), 0.4)


@pytest.mark.parametrize("name", ZOO)
def test_cost_model_matches_pruned_zoo(name: str) -> None:
    torch.manual_seed(0)
    model = resolve_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    for ratio in (0.3, 0.7):
        _check(model, x, ratio)


def test_cost_is_differentiable_and_its_gradient_is_right() -> None:
    torch.manual_seed(0)
    model = resolve_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    cost = CostModel(pk.trace(model, x), model, x)
    keep = torch.full((len(cost.sizes),), 0.6, dtype=torch.float64, requires_grad=True)
    flops = cost.flops(cost.from_keep(keep))
    flops.backward()
    assert keep.grad is not None and (keep.grad > 0).all()  # every group's width costs FLOPs
    eps = 1e-4
    for g in range(len(cost.sizes)):
        up, down = keep.detach().clone(), keep.detach().clone()
        up[g] += eps
        down[g] -= eps
        numeric = (cost.flops(cost.from_keep(up)) - cost.flops(cost.from_keep(down))) / (2 * eps)
        assert float(keep.grad[g]) == pytest.approx(float(numeric), rel=1e-6)


def test_multi_channel_positions_use_the_union() -> None:
    """A head-dim position shared by every head survives while any head does: one head of four
    left, ``q @ k^T`` still contracts over the whole head dim (tiny_vit's attention reshapes
    into heads)."""
    from nets import NETS

    torch.manual_seed(0)
    model, x = NETS["tiny_vit"][0]().eval(), torch.randn(2, 3, 16, 16)
    graph = pk.trace(model, x)
    cost = CostModel(graph, model, x)
    assert cost.base_flops == count_flops(model, x)
    small, plan = pk.prune(model, x, ratio=0.0, group_ratios={"attn.qkv": 0.75}, graph=graph, return_plan=True)
    assert small.attn.num_heads == 1
    assert float(cost.flops(cost.mask_of_plan(plan))) == count_flops(small, x)


def test_budget_solver_uses_the_cost_model(monkeypatch) -> None:
    """target_flops lands on the target without pruning a candidate per bisection step."""
    import prunekit.api as api

    model = resolve_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    calls = {"n": 0}
    real = api.apply_plan

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "apply_plan", counting)
    small, plan = pk.prune(model, x, target_flops=0.5, return_plan=True)
    assert calls["n"] == 1  # only the chosen plan is applied
    kept = count_flops(small, x) / count_flops(model, x)
    assert kept <= 0.5 and kept == pytest.approx(0.5, abs=0.01)
    assert plan.meta["flops_kept"] == pytest.approx(kept)
    assert np.isfinite(plan.meta["ratio"])


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_cifar"])
def test_latency_cost_equals_the_tables_estimate(name: str) -> None:
    from prunekit.measure.latency_table import LatencyTable, LayerTiming

    torch.manual_seed(0)
    model = resolve_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    f = (0.25, 0.5, 0.75, 1.0)
    rng = np.random.default_rng(0)
    layers = {}
    for n, m in model.named_modules():  # uneven, non-bilinear timings so interpolation is exercised
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            cin = m.in_channels if isinstance(m, torch.nn.Conv2d) else m.in_features
            cout = m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
            grid = np.sqrt(np.outer(f, f)) * (1 + rng.random((4, 4))) * 1e-3
            layers[n] = LayerTiming(cin, cout, np.maximum.accumulate(np.maximum.accumulate(grid, 0), 1))
    table = LatencyTable(layers, f, model_ms=3.0, device="cpu")
    graph = pk.trace(model, x)
    cost = CostModel(graph, model, x, latency_table=table)
    assert cost.base("latency") == pytest.approx(table.estimate(model))
    for ratio in (0.3, 0.6, 0.85):
        small, plan = pk.prune(model, x, ratio=ratio, criterion="random", graph=graph, return_plan=True)
        est = float(cost.latency(cost.mask_of_plan(plan)))
        assert est == pytest.approx(table.estimate(small), rel=1e-9)
        assert est < table.estimate(model)
