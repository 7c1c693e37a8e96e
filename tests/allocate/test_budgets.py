"""Budgets: target_flops / target_params / target_latency land within 1% of the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prunekit as pk
from prunekit.measure import count_flops, count_params
from prunekit.measure.latency_table import LatencyTable, LayerTiming, build_latency_table
from prunekit.zoo.models import create_model

X = torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_cifar", "vgg16_bn_cifar"])
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_budget_lands_within_one_percent(name: str, kind: str) -> None:
    model = create_model(name).eval()
    head = [n for n, _ in model.named_modules()][-1]
    small = pk.prune(model, X, ignore=[head], **{f"target_{kind}": 0.5})
    measure = (lambda m: count_flops(m, X)) if kind == "flops" else count_params
    kept = measure(small) / measure(model)
    assert 0.49 <= kept <= 0.5, kept


def _fake_table(model: torch.nn.Module) -> LatencyTable:
    """Deterministic timings: each layer costs in * out (like its MACs per position)."""
    f = (0.25, 0.5, 0.75, 1.0)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            cin, cout = m.in_channels, m.out_channels
            layers[name] = LayerTiming(cin, cout, np.outer(f, f) * cin * cout * 1e-6)
    return LatencyTable(layers, f, model_ms=2.0, device="cpu")


def test_latency_budget_meets_the_tables_estimate() -> None:
    model = create_model("resnet20").eval()
    table = _fake_table(model)
    assert table.estimate(model) == pytest.approx(2.0)
    small = pk.prune(model, X, ignore=["fc"], target_latency=0.6, latency_table=table)
    assert 0.59 <= table.estimate(small) / 2.0 <= 0.6


def test_latency_table_interpolates_bilinearly() -> None:
    f = (0.5, 1.0)
    table = LatencyTable({"a": LayerTiming(8, 4, np.array([[1.0, 3.0], [5.0, 7.0]]))}, f, 10.0, "cpu")
    assert table.layer_ms("a", 8, 4) == 7.0
    assert table.layer_ms("a", 4, 2) == 1.0
    assert table.layer_ms("a", 6, 3) == pytest.approx((1 + 3 + 5 + 7) / 4)


def test_measured_table_covers_every_layer_and_the_unpruned_model() -> None:
    model = create_model("resnet20").eval()
    table = build_latency_table(model, X, fractions=(0.5, 1.0), min_run_time=0.002)
    convs = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(table.layers) == convs
    assert all((t.grid_ms > 0).all() for t in table.layers.values())
    assert table.estimate(model) == pytest.approx(table.model_ms)


def test_only_one_budget_and_in_range() -> None:
    model = create_model("resnet20").eval()
    with pytest.raises(pk.PruningError, match="give one budget"):
        pk.prune(model, X, target_flops=0.5, target_params=0.5)
    with pytest.raises(pk.PruningError, match="target_params=1.5"):
        pk.prune(model, X, target_params=1.5)


def test_latency_budget_builds_a_table_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunekit.measure import latency_table
    from prunekit.zoo.models import create_model as make

    # The table is built through the real path, but each layer's "time" is its weight count:
    # timings of a tiny model on a loaded machine are noise, and this test is about the solver.
    monkeypatch.setattr(latency_table, "_time", lambda layer, *a, **k: 1e-3 * layer.weight.numel() + 1e-3)
    model = make("small_cnn", in_chans=1).eval()
    x = torch.randn(1, 1, 8, 8)
    _, plan = pk.prune(model, x, target_latency=0.7, return_plan=True)
    assert plan.meta["target_latency"] == 0.7
    assert 0.6 <= plan.meta["latency_kept"] <= 0.7  # by the measured table's estimate
