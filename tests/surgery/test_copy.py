"""copy_module behaves like copy.deepcopy on module trees (it is only faster)."""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

from prunekit.surgery import copy_module


class Shared(nn.Module):
    """A reused module, tied weights, a list attribute and a module held outside _modules."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.again = self.block  # the same module twice
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.sizes = [1, 2, 3]
        self.config = {"depth": [2, 2], "act": "relu"}
        self.helpers = [nn.ReLU()]


class Custom(nn.Linear):
    """A class with its own __deepcopy__ is copied by deepcopy itself."""

    copied = 0

    def __deepcopy__(self, memo: dict) -> "Custom":
        Custom.copied += 1
        new = Custom(self.in_features, self.out_features)
        new.load_state_dict(self.state_dict())
        return new


def _same_tree(a: nn.Module, b: nn.Module) -> None:
    assert [(n, type(m)) for n, m in a.named_modules(remove_duplicate=False)] == \
        [(n, type(m)) for n, m in b.named_modules(remove_duplicate=False)]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_copy_module_matches_deepcopy_and_keeps_aliases() -> None:
    torch.manual_seed(0)
    m = Shared()
    m.block[0].register_forward_hook(lambda mod, i, o: None)
    c, d = copy_module(m), copy.deepcopy(m)
    _same_tree(c, d)
    assert c.again is c.block and c.head.weight is c.emb.weight  # aliasing as in the original
    assert c.block is not m.block and c.emb.weight is not m.emb.weight  # nothing shared with it
    assert c.sizes == m.sizes and c.sizes is not m.sizes
    assert c.config == m.config and c.config["depth"] is not m.config["depth"]
    assert type(c.helpers[0]) is nn.ReLU and c.helpers[0] is not m.helpers[0]
    assert len(c.block[0]._forward_hooks) == 1 and c.block[0]._forward_hooks is not m.block[0]._forward_hooks
    with torch.no_grad():
        c.block[0].weight.add_(1.0)
    assert not torch.equal(c.block[0].weight, m.block[0].weight)


def test_copy_module_defers_to_custom_deepcopy_and_runs_the_copy() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(Custom(3, 2), nn.ReLU())
    before = Custom.copied
    c = copy_module(m)
    assert Custom.copied == before + 1
    x = torch.randn(4, 3)
    assert torch.equal(c(x), m(x))


def test_copy_module_on_a_torchvision_model_gives_the_same_function() -> None:
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v3_small().eval()
    c = copy_module(m)
    _same_tree(c, m)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(c(x), m(x))
    assert c.training == m.training and c.features[1].block[1].avgpool.output_size == 1


def test_blockwise_slicing_matches_plain_index_select(monkeypatch) -> None:
    import prunekit.surgery as surgery

    torch.manual_seed(0)
    for shape in ((64, 50, 3, 3), (300, 40)):
        w = torch.randn(*shape)
        picks = [(0, torch.randperm(shape[0])[: shape[0] // 2].sort().values),
                 (1, torch.randperm(shape[1])[:7].sort().values)]
        ref = w.index_select(0, picks[0][1]).index_select(1, picks[1][1])
        monkeypatch.setattr(surgery, "_BIG", 100)  # force blocks of a few rows
        assert torch.equal(surgery._select(w, picks), ref)
