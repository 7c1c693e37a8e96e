"""A prune that cannot be exact says so: ops that combine removed channels with kept ones
(normalisation statistics, a softmax or L2 norm over channels) are listed in
``plan.meta["inexact"]``, and only those (checked against the masked reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunekit as pk
from prunekit.surgery.reference import masked_reference


class Mixer(nn.Module):
    """conv -> ``how`` -> conv, where ``how`` combines channels or not."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.c1(x))
        if self.how == "normalize":  # SSD300's L2Norm on conv4_3
            y = F.normalize(y, dim=1) * 20.0
        elif self.how == "softmax_channels":
            y = y.softmax(dim=1)
        elif self.how == "groupnorm":
            y = self.gn(y)
        elif self.how == "softmax_space":  # over positions: channels stay separate
            y = y.flatten(2).softmax(dim=-1).view_as(y)
        return self.c2(y)


@pytest.mark.parametrize("how, inexact", [("normalize", "'normalize' over dim 1"), ("softmax_channels", "'softmax' over dim 1"),
                                         ("groupnorm", "'group_norm'"), ("softmax_space", None), ("none", None)])
def test_inexact_ops_are_listed_exactly_when_the_prune_differs(how: str, inexact: str | None) -> None:
    torch.manual_seed(0)
    model, x = Mixer(how).eval(), torch.randn(2, 3, 6, 6)
    graph = pk.trace(model, x, ignore=["c2"])
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert small.c1.out_channels == 4
    with torch.no_grad():
        err = float((small(x) - masked_reference(model, graph, plan)(x)).abs().max())
    if inexact is None:
        assert "inexact" not in plan.meta and err < 1e-5
    else:
        assert any(s.startswith(inexact) for s in plan.meta["inexact"]), plan.meta.get("inexact")
        assert err > 1e-3  # the flag is right: the pruned model does differ
