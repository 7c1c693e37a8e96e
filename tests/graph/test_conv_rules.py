"""Convolution and padding rules that used to under-prune silently.

* A depthwise conv with a channel multiplier (``groups == C_in``, ``C_out = k * C_in``): each
  input channel goes with its ``k`` outputs (it used to tie every input channel into one).
* Constant ("same") padding over spatial dims keeps the channels (it used to block them).
* A functional depthwise conv whose ``groups`` is a module attribute (a blur pool): the
  attribute follows the pruned channel count (it used to make validation keep the group).

Oracle: the original with removed channels zeroed at consumers (``masked_reference``); each
test also checks that channels were removed, so a rule that blocks everything fails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from nets import randomize_bn
from prunekit.measure import count_params
from prunekit.surgery.reference import masked_reference


def _exact(model: nn.Module, x: torch.Tensor, **options) -> tuple[nn.Module, object]:
    model.eval()
    graph = pk.trace(model, x)
    small, plan = pk.prune(model, x, graph=graph, return_plan=True, criterion="random", **options)
    assert plan.meta["repairs"] == [], plan.meta["repairs"]
    with torch.no_grad():
        want = masked_reference(model, graph, plan).eval()(x)
        got = small.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * (want.abs().max().item() + 1e-6))
    assert count_params(small) < count_params(model), "nothing was pruned"
    return small, plan


class Multiplier(nn.Module):
    """A 1x1 conv, then a depthwise conv with 3 outputs per input channel (BN after it), a
    1x1 conv on the 24 outputs, and a residual add over those 24 (so an add couples the
    multiplied outputs with another layer's channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 24, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(24)
        self.side = nn.Conv2d(3, 24, 1)
        self.b = nn.Conv2d(24, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.dw(self.a(x)))) + self.side(x)).mean((2, 3))


def test_channel_multiplier_prunes_an_input_channel_with_its_outputs() -> None:
    torch.manual_seed(0)
    model = randomize_bn(Multiplier())
    x = torch.randn(2, 3, 8, 8)
    graph = pk.trace(model.eval(), x)
    (group,) = [g for g in graph.groups if g.name.startswith("a")]
    assert group.size == 8 and group.n_prunable == 8  # one channel per input of dw, not one in all
    assert set(group.modules()) >= {"a", "dw", "bn", "side", "b"}
    small, _ = _exact(model, x, ratio=0.5)
    assert (small.dw.in_channels, small.dw.out_channels, small.dw.groups) == (4, 12, 4)
    assert small.side.out_channels == 12 and small.b.in_channels == 12


class SamePadded(nn.Module):
    """TensorFlow-style "same" padding (asymmetric zero padding of H and W) before strided
    and depthwise convs, a padding of the width only on a 3-D tensor, and a constant pad of
    the channel dim (its two new channels are fixed; the padded ones still prune)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv1d(6, 5, 2)
        self.d = nn.Conv1d(7, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(F.pad(x, (0, 1, 0, 1)))
        y = self.b(self.dw(F.pad(y, (1, 1, 1, 1), value=0.5)))
        z = self.c(F.pad(y.flatten(2), (1, 0)))
        return self.d(F.pad(z, (0, 0, 1, 1))).mean(-1)  # 5 -> 7 channels, two of them zeros


def test_spatial_constant_padding_keeps_the_channels() -> None:
    torch.manual_seed(0)
    model = SamePadded()
    x = torch.randn(2, 3, 9, 9)
    graph = pk.trace(model.eval(), x)
    groups = {g.name: g for g in graph.groups}
    assert [groups[n].n_prunable for n in ("a", "b", "c")] == [8, 6, 5], graph.unprunable()
    small, _ = _exact(model, x, ratio=0.5)
    assert small.a.out_channels == small.dw.groups == 4 and small.b.out_channels == 3
    assert small.d.in_channels == small.c.out_channels + 2  # the padded channels stay


class Blur(nn.Module):
    """A fixed blur as a functional depthwise conv whose groups is an attribute (timm's
    BlurPool2d, tresnet's anti-aliasing), reflect-padded."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.stride = 2
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (k[:, None] * k[None, :] / 16).expand(channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt, stride=self.stride, groups=self.channels)


class Blurred(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.blur = Blur(8)
        self.b = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.blur(torch.relu(self.a(x)))).mean((2, 3))


def test_functional_depthwise_groups_attribute_is_rewritten() -> None:
    torch.manual_seed(0)
    model = Blurred()
    x = torch.randn(2, 3, 8, 8)
    small, plan = _exact(model, x, ratio=0.5)
    assert small.blur.channels == 4 and small.blur.filt.shape[0] == 4
    assert small.blur.stride == 2  # another int attribute of the module stays
    (note,) = plan.meta["inferred_attrs"]
    assert note.startswith("blur.channels: 8 -> 4")
