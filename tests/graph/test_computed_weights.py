"""Weights computed in forward from parameters are sliced through those parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.surgery.reference import masked_reference


class StdConv(nn.Conv2d):
    """Weight standardisation as timm's StdConv2d does it: batch_norm over each filter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ScaledStdConv(nn.Conv2d):
    """timm's ScaledStdConv2d: the same with a per-filter gain (the batch_norm weight)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0., eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class MeanStdConv(nn.Conv2d):
    """Weight standardisation written with mean/std over dims 1, 2, 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class CastConv(nn.Conv2d):
    """An element-wise function of the weight (a cast, a scale): both its dims can go."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype) * 2.0, self.bias.to(x.dtype), self.stride, self.padding)


class ConvNet(nn.Module):
    def __init__(self, conv: type[nn.Conv2d]) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = conv(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def _prune(model: nn.Module, x: torch.Tensor, ignore: list[str]):
    graph = pk.trace(model, x, ignore=ignore)
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    ref = masked_reference(model, graph, plan)
    with torch.no_grad():
        err = (small(x) - ref(x)).abs().max().item()
    return graph, small, plan, err


@pytest.mark.parametrize("conv", [StdConv, ScaledStdConv, MeanStdConv])
def test_a_standardised_conv_loses_filters_and_keeps_its_inputs(conv: type[nn.Conv2d]) -> None:
    torch.manual_seed(0)
    model = ConvNet(conv).eval()
    x = torch.randn(2, 3, 8, 8)
    graph, small, plan, err = _prune(model, x, ["d"])
    # Statistics per filter: filters can go. They mix the input channels: those stay (a's).
    assert (small.a.out_channels, small.b.out_channels, small.c.out_channels) == (8, 4, 4)
    assert small.b.weight.shape == (4, 8, 3, 3) and err < 1e-5 and not plan.meta["repairs"]
    if conv is ScaledStdConv:
        assert small.b.gain.shape == (4, 1, 1, 1)
    assert "computed with its dim 1 mixed" in graph.unprunable()["a"][0]


def test_an_elementwise_function_of_a_weight_is_sliced_along_both_dims() -> None:
    torch.manual_seed(0)
    model = ConvNet(CastConv).eval()
    x = torch.randn(2, 3, 8, 8)
    graph, small, plan, err = _prune(model, x, ["d"])
    assert small.b.weight.shape == (4, 4, 3, 3) and small.a.out_channels == 4 and small.b.bias.shape == (4,)
    assert err < 1e-5 and not plan.meta["repairs"]


class QKVBias(nn.Module):
    """BEiT / EVA attention: the qkv bias is ``cat((q_bias, k_bias, v_bias))`` with a zero k
    part (a buffer, ``zeros_like(v_bias)``, or a constant ``torch.zeros``)."""

    def __init__(self, k_part: str, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.k_part = heads, k_part
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        k = {"buffer": self.k_bias, "zeros_like": torch.zeros_like(self.v_bias),
             "constant": torch.zeros(16)}[self.k_part]
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, k, self.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(out)


class Residual(nn.Module):
    def __init__(self, k_part: str) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = QKVBias(k_part)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        return self.head((x + self.attn(x)).mean(1))


@pytest.mark.parametrize("k_part", ["buffer", "zeros_like"])
def test_a_concatenated_qkv_bias_is_sliced_through_its_parts(k_part: str) -> None:
    torch.manual_seed(0)
    model = Residual(k_part).eval()
    x = torch.randn(2, 5, 8)
    graph, small, plan, err = _prune(model, x, ["head"])
    attn = small.attn
    assert attn.heads == 1 and attn.qkv.out_features == 24 and attn.q_bias.shape == attn.v_bias.shape == (8,)
    if k_part == "buffer":
        assert attn.k_bias.shape == (8,)
    assert err < 1e-5 and not plan.meta["repairs"]


def test_a_constant_part_of_a_computed_bias_keeps_its_channels() -> None:
    torch.manual_seed(0)
    model = Residual("constant").eval()
    x = torch.randn(2, 5, 8)
    graph, small, plan, err = _prune(model, x, ["head"])
    # torch.zeros(16) has a size fixed by code: the k channels, hence every head, stay.
    assert small.attn.heads == 2 and small.attn.qkv.out_features == 48 and err < 1e-5
    assert "holds constants" in graph.unprunable()["attn.qkv"][0]
