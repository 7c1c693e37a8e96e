"""Residual blocks found from the traced graph (``DependencyGraph.blocks``).

Every expected count comes from the architecture's definition, not from running the code:

* torchvision resnet18: layers [2, 2, 2, 2] of BasicBlocks = 8 blocks; the first block of
  layer2-4 has stride 2 and doubles the channels, so its shortcut is ``downsample``.
* mobilenet_v2: an InvertedResidual adds its input when stride == 1 and in == out
  channels; in the setting (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2)
  (6,96,3,1) (6,160,3,2) (6,320,1,1) that holds for blocks 2..n of each stage (the first
  changes channels or stride): 0 + 1 + 2 + 3 + 2 + 2 + 0 = 10.
* convnext_tiny: stage depths (3, 3, 9, 3) = 18 CNBlocks, each
  ``input + stochastic_depth(layer_scale * block(input))``.
* vit_b_16: 12 encoder layers, each with two residual adds (attention, MLP) = 24.
* prunekit.zoo resnet20: depth 20 = 6n + 2, n = 3 blocks per stage, 3 stages = 9; the
  first blocks of stages 2 and 3 change width and stride (projection shortcut).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit import zoo
from prunekit.graph import ResidualBlock, blocks

torchvision = pytest.importorskip("torchvision")


def _blocks(model: nn.Module, size: int = 64) -> list[ResidualBlock]:
    return blocks(prunekit.trace(model.eval(), torch.randn(1, 3, size, size)))


def test_resnet18_blocks_shortcuts_params_and_flops() -> None:
    bs = _blocks(torchvision.models.resnet18())
    names = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert [b.name for b in bs] == names
    for b in bs:
        projected = b.name in ("layer2.0", "layer3.0", "layer4.0")
        assert b.identity_shortcut is not projected
        assert b.shortcut_modules == ((f"{b.name}.downsample.0", f"{b.name}.downsample.1") if projected else ())
        assert b.branch_modules == tuple(f"{b.name}.{m}" for m in ("conv1", "bn1", "relu", "conv2", "bn2"))
    first = bs[0]
    # Two 3x3 64->64 convs (no bias) and two BatchNorms (weight + bias) on the branch.
    assert first.params == 2 * 64 * 64 * 9 + 2 * 2 * 64
    # 64x64 input: stem conv stride 2 and max-pool stride 2 leave 16x16 maps in layer1.
    assert first.flops == 2 * (2 * 64 * 16 * 16 * 64 * 9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.name = "x"  # type: ignore[misc]


def test_mobilenet_v2_inverted_residuals() -> None:
    model = torchvision.models.mobilenet_v2()
    bs = _blocks(model)
    assert len(bs) == 10
    assert all(b.identity_shortcut and not b.shortcut_modules for b in bs)
    assert all(model.get_submodule(b.name).use_res_connect for b in bs)


def test_convnext_branch_includes_layer_scale_and_stochastic_depth() -> None:
    g = prunekit.trace(torchvision.models.convnext_tiny().eval(), torch.randn(1, 3, 64, 64))
    bs = g.blocks()
    assert len(bs) == 18
    ops = g.state.ops["eval"]
    for b in bs:
        assert b.identity_shortcut
        assert b.branch_modules[-1] == f"{b.name}.stochastic_depth"  # no op in eval, still on the branch
        assert f"{b.name}.block.0" in b.branch_modules
        # The layer-scale multiply runs in CNBlock.forward itself, on the branch.
        assert any(ops[i].name == "mul" and ops[i].module == b.name for i in b.branch_ops)


def test_vit_attention_and_mlp_blocks() -> None:
    bs = _blocks(torchvision.models.vit_b_16(), 224)
    assert len(bs) == 24
    for i in range(12):
        attn, mlp = bs[2 * i], bs[2 * i + 1]
        layer = f"encoder.layers.encoder_layer_{i}"
        assert attn.name == mlp.name == layer
        assert attn.branch_modules == (f"{layer}.ln_1", f"{layer}.self_attention", f"{layer}.dropout")
        assert mlp.branch_modules[0] == f"{layer}.ln_2" and f"{layer}.mlp.3" in mlp.branch_modules
        # 197 tokens of width 768: q, k, v and output projections plus the two attention products.
        assert attn.flops == 2 * 768 * 768 * 4 * 197 + 4 * 197 * 197 * 768
        assert mlp.flops == 2 * 2 * 197 * 768 * 3072  # two linear layers 768 <-> 3072


def test_zoo_resnet20() -> None:
    bs = _blocks(zoo.resnet20(), 32)
    assert len(bs) == 9
    projected = [b.name for b in bs if not b.identity_shortcut]
    assert projected == ["layer2.0", "layer3.0"]
    assert bs[3].shortcut_modules == ("layer2.0.downsample.0", "layer2.0.downsample.1")


def test_no_residual_no_blocks() -> None:
    vgg = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    assert _blocks(vgg, 16) == []


class _TanhGelu(nn.Module):
    """GELU's tanh approximation: ``x + 0.044715 * x**3`` adds a value to its own input
    through element-wise arithmetic only, which is not a residual block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3))))


class _Functional(nn.Module):
    """A residual join in the root forward: the block is the root, its branch ``body``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.act = _TanhGelu()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        return F.relu(x + self.body(x))


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _AddModule(nn.Module):
    """The add runs in its own module, whose call holds neither operand's path: the block
    is the smallest enclosing call that does (the root)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.add = _Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.add(x, self.body(x))


def test_element_wise_self_add_is_not_a_block_and_root_join_is() -> None:
    bs = _blocks(_Functional(), 8)
    assert [(b.name, b.branch_modules, b.identity_shortcut) for b in bs] == [("", ("body.0", "body.1"), True)]
    assert bs[0].params == 8 * 8 * 9 + 8


def test_add_inside_its_own_module_belongs_to_the_enclosing_call() -> None:
    bs = _blocks(_AddModule(), 8)
    assert [(b.name, b.branch_modules, b.shortcut_modules) for b in bs] == [("", ("body.0", "body.1"), ())]


def test_untraced_mode_is_an_error() -> None:
    g = prunekit.trace(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 4, 4), modes=("eval",))
    with pytest.raises(prunekit.PruningError, match="was not traced"):
        g.blocks("train")
