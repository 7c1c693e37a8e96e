"""A prune that removes nothing, or far less than asked, says so (warning and plan.meta)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import prunekit as pk


class ReshapesByWidth(nn.Module):
    """Every conv's width is hard-coded in a view: no channel can go."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        return self.fc(y.view(y.shape[0], 8, 16).reshape(y.shape[0], -1))


def _conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_a_prune_that_removes_nothing_warns_and_says_why() -> None:
    model, x = ReshapesByWidth().eval(), torch.randn(1, 3, 4, 4)
    with pytest.warns(pk.PruningShortfallWarning, match="removed 0 channels"):
        small, plan = pk.prune(model, x, ratio=0.5, ignore=["fc"], return_plan=True)
    assert plan.is_empty and "ratio=0.5" in plan.meta["shortfall"]
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())


def test_a_ratio_for_one_module_that_cannot_be_pruned_warns() -> None:
    model, x = ReshapesByWidth().eval(), torch.randn(1, 3, 4, 4)
    with pytest.warns(pk.PruningShortfallWarning, match="cannot be pruned"):
        _, plan = pk.prune(model, x, ratio=0.0, ratios={"c1": 0.5}, ignore=["fc"], return_plan=True)
    assert plan.is_empty


def test_a_prune_that_does_what_was_asked_is_silent() -> None:
    model, x = _conv_net(), torch.randn(1, 3, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.PruningShortfallWarning)
        _, plan = pk.prune(model, x, ratio=0.5, return_plan=True)
        _, plan2 = pk.prune(model, x, target_flops=0.5, return_plan=True)
    assert "shortfall" not in plan.meta and "shortfall" not in plan2.meta
    assert plan.meta["channels_removed"] == 8


def test_a_model_with_no_prunable_channel_at_all_warns() -> None:
    """Every channel reaches the output: a ratio can ask for nothing, yet nothing was done
    (GPT-2 before its Conv1D had a rule came back unpruned without a word)."""
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), torch.randn(1, 3, 4, 4)
    with pytest.warns(pk.PruningShortfallWarning, match="removed 0 of 4 channels") as record:
        _, plan = pk.prune(model, x, ratio=0.5, return_plan=True)
    assert plan.is_empty and "no channel of the model is prunable" in plan.meta["shortfall"]
    assert len(record) == 1
