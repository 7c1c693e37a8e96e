"""Label compaction on 0-d and empty tensors (torchvision's detectors build both)."""

from __future__ import annotations

import torch
from torch import nn

import prunekit as pk
from prunekit.graph.labels import compact
from prunekit.surgery.reference import masked_reference


def test_compact_keeps_0d_and_empty_labels() -> None:
    assert compact(torch.tensor(3)).shape == ()
    assert compact(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5)
    assert compact(torch.tensor([[2, 2, 2]])).shape == (1, 1)  # the ordinary case still narrows
    assert compact(torch.tensor([[1, 2, 3]])).tolist() == [[1, 2, 3]]


class ScalarsAndEmpties(nn.Module):
    """Uses a 0-d ratio of tensors built in the forward (as torchvision's ``resize_boxes``) and
    an empty reduction, around prunable convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(x.shape[-1]) / torch.tensor(4.0)
        empty = x.new_zeros(0, 4).sum(0)
        return self.c2(self.c1(x) * scale) + empty.view(1, 4, 1, 1)


def test_a_model_with_0d_and_empty_tensors_prunes_exactly() -> None:
    torch.manual_seed(0)
    model, x = ScalarsAndEmpties().eval(), torch.randn(2, 3, 8, 8)
    graph = pk.trace(model, x)
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert small.c1.out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_reference(model, graph, plan)(x), rtol=1e-5, atol=1e-5)
