"""Which forward modes the trace runs: only those that change the channel flow."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import StochasticDepth

import prunekit as pk
from prunekit.runtime import model_mode


class Regularised(nn.Module):
    """Dropout and stochastic depth only mask values in training: same channel flow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout2d(0.2)
        self.sd = StochasticDepth(0.2, "row")
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = y + self.sd(self.conv2(self.drop(y)))
        return self.head(y)


class Branchy(Regularised):
    """Code that branches on ``self.training`` gets its own training-mode trace."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        out = self.head(y + self.sd(self.conv2(self.drop(y))))
        if self.training:
            out = out + self.aux(y).sum() * 0
        return out


def test_mask_regularisers_do_not_force_a_training_trace() -> None:
    g = pk.trace(Regularised(), torch.randn(1, 3, 8, 8))
    assert set(g.state.ops) == {"eval"}
    g2 = pk.trace(Branchy(), torch.randn(1, 3, 8, 8))
    assert set(g2.state.ops) == {"eval", "train"}
    assert any(m.tensor == "aux.weight" for grp in g2.groups for m in grp.members)


def test_model_mode_restores_every_flag() -> None:
    m = Branchy()
    m.drop.eval()  # a user's own mix of flags comes back unchanged
    before = {n: mod.training for n, mod in m.named_modules()}
    with model_mode(m, "train"):
        assert m.training and not m.sd.training and not m.drop.training
    assert {n: mod.training for n, mod in m.named_modules()} == before
    with model_mode(m, "eval"):
        assert not any(mod.training for mod in m.modules())
    assert {n: mod.training for n, mod in m.named_modules()} == before
