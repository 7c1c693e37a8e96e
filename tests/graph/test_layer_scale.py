"""A per-channel scale broadcast over tokens whose channels come from two groups (XCiT's class
attention: ``gamma * cat([attn(x)[:, :1], x[:, 1:]])``) couples those groups and is sliced with
them; a one-channel gate or one side of an outer product is still no per-channel operand."""

from __future__ import annotations

import torch
from torch import nn

import prunekit as pk
from prunekit.surgery.reference import masked_reference


class ClassAttentionBlock(nn.Module):
    """The class token is rewritten by a projection, the patch tokens pass; one layer scale
    multiplies both, then the residual joins them."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.fc = nn.Linear(dim, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        both = torch.cat([self.proj(x[:, :1]), x[:, 1:]], dim=1)
        x = x + self.gamma * both
        return self.head(torch.relu(self.fc(x)).mean(1))


def test_a_layer_scale_over_two_token_sets_is_sliced_with_both_and_exact() -> None:
    torch.manual_seed(0)
    model = ClassAttentionBlock().eval()
    x = torch.randn(2, 5, 6)
    graph = pk.trace(model, x, ignore=["head"])
    small, plan = pk.prune(model, x, graph=graph, ratio=0.5, return_plan=True)
    assert not plan.meta["repairs"]
    width = small.embed.out_features
    assert width == 8 and small.proj.out_features == width and small.gamma.shape == (width,)
    with torch.no_grad():
        assert torch.allclose(small(x), masked_reference(model, graph, plan)(x), atol=1e-5)


class Gated(nn.Module):
    """A one-channel spatial gate over all channels, and an outer product of two vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.gate = nn.Conv2d(3, 1, 1)
        self.u = nn.Linear(3, 6)
        self.v = nn.Linear(3, 5)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) * torch.sigmoid(self.gate(x))  # one gate channel must not tie a's 8
        p = x.mean((2, 3))
        outer = self.u(p)[:, :, None] * self.v(p)[:, None, :]  # (B, 6, 5): u's channels along dim 1, v's along 2
        return self.b(y).mean((2, 3)).sum(1) + outer.sum((1, 2))


def test_a_one_channel_gate_and_an_outer_product_keep_their_channels_apart() -> None:
    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(2, 3, 4, 4)
    graph = pk.trace(model, x)
    by_name = {g.name: g for g in graph.groups}
    # a's 8 channels stay 8 channels (not one, as a gate tying them would make them), and
    # u's 6 and v's 5 stay two groups.
    assert by_name["a"].size == 8 and by_name["u"].size == 6 and by_name["v"].size == 5
