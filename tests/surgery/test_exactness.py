"""Pruned model == original with removed channels zeroed at consumers (the oracle)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from nets import NETS, randomize_bn
from prunekit.measure import count_params
from prunekit.surgery.reference import masked_reference


def _outputs(model: nn.Module, x) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_exact(model: nn.Module, x, ratio: float = 0.5, criterion: str = "l2", repairs: bool = False,
                 **kw) -> nn.Module:
    model.eval()
    graph = pk.trace(model, x)
    small, plan = pk.prune(model, x, ratio=ratio, criterion=criterion, graph=graph, return_plan=True, **kw)
    if not repairs:
        assert plan.meta["repairs"] == [], "the trace should have predicted every shape"
    ref = masked_reference(model, graph, plan).eval()
    for got, want in zip(_outputs(small.eval(), x), _outputs(ref, x)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * (want.abs().max().item() + 1e-6))
    return small


@pytest.mark.parametrize("name", sorted(NETS))
def test_hand_built_nets_are_exact(name: str) -> None:
    torch.manual_seed(0)
    build, inputs = NETS[name]
    model = randomize_bn(build())
    x = inputs()
    before = count_params(model)
    small = assert_exact(model, x)
    assert count_params(small) < before, "nothing was pruned"


@pytest.mark.parametrize("name", sorted(NETS))
def test_pruning_nothing_is_identity(name: str) -> None:
    torch.manual_seed(1)
    build, inputs = NETS[name]
    model = randomize_bn(build()).eval()
    x = inputs()
    small = pk.prune(model, x, ratio=0.0)
    assert count_params(small) == count_params(model)
    for got, want in zip(_outputs(small.eval(), x), _outputs(model, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


TORCHVISION = [
    ("resnet18", 64), ("mobilenet_v3_small", 64), ("shufflenet_v2_x0_5", 64), ("squeezenet1_1", 64),
    ("regnet_x_400mf", 64), ("efficientnet_b0", 64), ("densenet121", 64), ("googlenet", 64), ("mnasnet0_5", 64),
]


@pytest.mark.parametrize("name,size", TORCHVISION)
def test_torchvision_models_are_exact(name: str, size: int) -> None:
    torch.manual_seed(0)
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    model = randomize_bn(torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs))
    x = torch.randn(1, 3, size, size)
    small = assert_exact(model, x, ratio=0.4)
    assert count_params(small) < 0.8 * count_params(model)


def test_training_only_branch_survives_in_both_modes() -> None:
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    small = pk.prune(model.eval(), x, ratio=0.5)
    small.train()
    out = small(x)
    assert out.logits.shape == (2, 10) and out.aux_logits1.shape == (2, 10) and out.aux_logits2.shape == (2, 10)
    out.logits.sum().backward()  # trainable after surgery
    small.eval()
    assert small(x).shape == (2, 10)


def test_grouped_conv_keeps_equal_channels_per_group() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d(weights=None, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    small = pk.prune(model, x, ratio=0.5)
    conv = small.layer1[0].conv2
    assert conv.groups == 32
    assert conv.in_channels % 32 == 0 and conv.out_channels % 32 == 0
    assert conv.in_channels == 64  # 128 -> 64: two of the four channels of every group
    small.eval()(x)


def test_attention_heads_are_pruned_whole_and_num_heads_updated() -> None:
    torch.manual_seed(0)
    model = NETS["tiny_vit"][0]()
    x = torch.randn(2, 3, 16, 16)
    small = assert_exact(model, x, ratio=0.5)
    attn = small.attn
    assert attn.num_heads == 2 and attn.head_dim == 8 and attn.attn_dim == 16
    assert attn.qkv.out_features == 3 * 16 and attn.proj.in_features == 16


# ---------------------------------------------------------------- random architectures
@st.composite
def random_net(draw):
    """A random stack of conv/bn/act/add/cat/split/depthwise/grouped blocks."""
    blocks = draw(st.lists(st.sampled_from(["conv", "residual", "cat", "split", "dw", "grouped"]), min_size=1, max_size=5))
    widths = draw(st.lists(st.sampled_from([4, 6, 8, 12]), min_size=len(blocks) + 1, max_size=len(blocks) + 1))
    return blocks, widths


class RandomNet(nn.Module):
    def __init__(self, blocks: list[str], widths: list[int]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.kinds = blocks
        layers = []
        c = widths[0]
        for kind, w in zip(blocks, widths[1:]):
            if kind == "conv":
                layers.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()))
                c = w
            elif kind == "residual":
                layers.append(nn.Sequential(nn.Conv2d(c, w, 1), nn.ReLU(), nn.Conv2d(w, c, 3, padding=1), nn.BatchNorm2d(c)))
            elif kind == "cat":
                layers.append(nn.ModuleList([nn.Conv2d(c, w, 1), nn.Conv2d(c, w // 2, 3, padding=1)]))
                c = w + w // 2
            elif kind == "split":
                layers.append(nn.Conv2d(c // 2, c // 2, 3, padding=1) if c % 2 == 0 else nn.Identity())
            elif kind == "dw":
                layers.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.SiLU()))
            elif kind == "grouped":
                g = 2 if c % 2 == 0 and w % 2 == 0 else 1
                layers.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1, groups=g), nn.ReLU()))
                c = w
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "residual":
                x = x + layer(x)
            elif kind == "cat":
                x = torch.cat([layer[0](x), layer[1](x)], 1)
            elif kind == "split" and not isinstance(layer, nn.Identity):
                a, b = x.chunk(2, 1)
                x = torch.cat([layer(a), b], 1)
            else:
                x = layer(x)
        return self.head(x.mean((2, 3)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_net(), st.sampled_from([0.25, 0.5, 0.75]), st.sampled_from(["l1", "l2", "random"]))
def test_random_architectures_are_exact(spec, ratio, criterion) -> None:
    torch.manual_seed(0)
    model = randomize_bn(RandomNet(*spec))
    x = torch.randn(2, 3, 8, 8)
    original = copy.deepcopy(model.state_dict())
    assert_exact(model, x, ratio=ratio, criterion=criterion)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), f"the user's model changed: {k}"
