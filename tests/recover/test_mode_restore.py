"""Helpers that run a model in eval mode give every submodule its own train/eval flag back.

The model is training with one BatchNorm frozen (``model.train(); bn.eval()``, as when
fine-tuning with fixed statistics): restoring only the top-level flag with
``model.train(was_training)`` would unfreeze that BatchNorm, so each check compares every
submodule's flag before and after, and also checks that no running statistic moved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.criteria.data import site_views, weight_taylor
from prunekit.criteria.reconstruction import consumer_rows
from prunekit.recover.evaluate import evaluate
from prunekit.recover.reconstruct import reconstruct


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _frozen_bn(model: nn.Module) -> nn.Module:
    model.train()
    model[1].eval()
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(2)]


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _stats(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


def _groups(model: nn.Module) -> list:
    return list(pk.trace(model, torch.randn(1, 3, 8, 8)).groups)


RUNS: dict[str, Callable[[nn.Module, Path], object]] = {
    "evaluate": lambda m, _: evaluate(m, _batches(), topk=(1,)),
    "site_views": lambda m, _: list(site_views(m, _groups(m), _batches(), with_grad=True)),
    "weight_taylor": lambda m, _: weight_taylor(m, _groups(m), _batches()),
    "consumer_rows": lambda m, _: consumer_rows(m, _groups(m), _batches()),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_eval_helpers_restore_every_flag(name: str, tmp_path: Path) -> None:
    model = _frozen_bn(_net())
    flags, stats = _flags(model), _stats(model)
    assert flags.count(False) == 1  # the check can fail: one flag differs from the model's
    RUNS[name](model, tmp_path)
    assert _flags(model) == flags
    assert all(torch.equal(a, b) for a, b in zip(_stats(model), stats))  # ran in eval mode


def test_reconstruct_restores_every_flag_of_both_models() -> None:
    original = _net().eval()
    x = torch.randn(1, 3, 8, 8)
    pruned, plan = pk.prune(original, x, ratio=0.5, return_plan=True)
    original, pruned = _frozen_bn(original), _frozen_bn(pruned)
    flags, stats = (_flags(pruned), _flags(original)), (_stats(pruned), _stats(original))
    assert reconstruct(pruned, original, plan, _batches())
    assert (_flags(pruned), _flags(original)) == flags
    for model, before in zip((pruned, original), stats):
        assert all(torch.equal(a, b) for a, b in zip(_stats(model), before))


def test_export_restores_every_flag(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from prunekit.export import export_onnx

    model = _frozen_bn(_net())
    flags = _flags(model)
    out = tmp_path / "m.onnx"
    assert export_onnx(model, torch.randn(1, 3, 8, 8), out)["match"]
    assert _flags(model) == flags
    assert out.stat().st_size > 0 and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left
