"""The classifier head from the trace, and the plan step giving it another class count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from nets import cbr
from prunekit.errors import PruningError
from prunekit.plan import PruningPlan
from prunekit.surgery.head import find_head, head_step


class ConvHead(nn.Module):
    """A fully convolutional classifier (1x1 conv, then pooling), its head registered first:
    neither the module order nor a type says which layer classifies."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(8, 6, 1, groups=groups)
        self.body = nn.Sequential(cbr(3, 8), cbr(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x)).mean((2, 3))


def test_the_head_is_the_last_layer_with_filters_to_run() -> None:
    x = torch.randn(2, 3, 8, 8)
    seq = nn.Sequential(cbr(3, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5), nn.ReLU())
    assert find_head(seq, pk.trace(seq.eval(), x)) == "3"
    conv = ConvHead().eval()
    assert find_head(conv, pk.trace(conv, x)) == "classifier"
    with pytest.raises(PruningError, match="no classifier head"):
        flat = nn.Sequential(nn.ReLU())
        find_head(flat, pk.trace(flat, x))


@pytest.mark.parametrize("make,name", [(lambda: nn.Sequential(cbr(3, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                             nn.Linear(4, 5)), "3"),
                                       (ConvHead, "classifier")], ids=["linear", "conv"])
def test_head_step_gives_another_class_count(make, name: str) -> None:
    """The body's outputs are untouched, the new head has 3 outputs and its layer kind and
    input width; the original model is unchanged."""
    model = make().eval()
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = head_step(model, name, 3)
    new = pk.apply_plan(model, PruningPlan((step,))).eval()
    old_head, new_head = model.get_submodule(name), new.get_submodule(name)
    assert type(new_head) is type(old_head) and new(x).shape == (2, 3)
    assert new_head.weight.shape[1:] == old_head.weight.shape[1:] and new_head.weight.shape[0] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
        if not k.startswith(name + "."):
            assert torch.equal(new.state_dict()[k], v), k


def test_a_head_that_cannot_have_that_many_outputs_is_refused() -> None:
    """A grouped conv (2 groups) cannot have 3 outputs; a bad class count or name is named."""
    model = ConvHead(groups=2)
    with pytest.raises(PruningError, match="cannot have exactly 3 outputs"):
        head_step(model, "classifier", 3)
    with pytest.raises(PruningError, match="num_classes=0"):
        head_step(model, "classifier", 0)
    with pytest.raises(PruningError, match="no such module"):
        head_step(model, "nothing", 3)
