"""Sizes read from tensors in forward: used as values they keep their channels (the result
stays exact), used as sizes they are rewritten by pruning as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.graph.sizes import SizeFloat, SizeInt, SizeTag, tagged, tags_of
from prunekit.surgery.reference import masked_reference

USES = {
    "sqrt_tensor": ("tensor", lambda y, c: y / torch.sqrt(torch.tensor(c))),  # RAFT's correlation scale
    "pow": ("mul", lambda y, c: y * c ** -0.5),
    "reciprocal": ("mul", lambda y, c: y * (1 / c)),
    "math_sqrt": ("float", lambda y, c: y / math.sqrt(c)),
    "size_call": ("div", lambda y, c: y / y.size(1)),
    "arange": ("arange", lambda y, c: y + torch.arange(c).view(1, -1, 1, 1)),  # channel indices as values
}


class ScaledByWidth(nn.Module):
    """conv a -> y / f(C), C read from y's shape -> conv b -> conv c."""

    def __init__(self, use) -> None:
        super().__init__()
        self.use = use
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = self.use(y, y.shape[1])
        return self.c(torch.relu(self.b(y)))


def _prune(model: nn.Module, x: torch.Tensor):
    graph = pk.trace(model, x, ignore=["c"])
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    ref = masked_reference(model, graph, plan)
    with torch.no_grad():
        err = (small(x) - ref(x)).abs().max().item()
    return graph, small, plan, err


@pytest.mark.parametrize("kind", list(USES))
def test_a_width_used_as_a_value_keeps_its_channels_and_the_result_exact(kind: str) -> None:
    torch.manual_seed(0)
    op, use = USES[kind]
    model = ScaledByWidth(use).eval()
    x = torch.randn(1, 3, 8, 8)
    graph, small, plan, err = _prune(model, x)
    # Pruning a's channels would change the value computed from C: they all stay, b's go.
    assert small.a.out_channels == 8 and small.b.out_channels == 4
    assert err < 1e-5
    (reason,) = graph.unprunable()["a"]
    assert "channel count read from a tensor's shape" in reason and (f"'{op}'" in reason or op in reason)
    assert not plan.meta["repairs"]


def test_a_width_used_as_a_size_is_still_pruned() -> None:
    torch.manual_seed(0)
    model = ScaledByWidth(lambda y, c: y.view(y.shape[0], c, -1).view_as(y)).eval()
    x = torch.randn(1, 3, 8, 8)
    graph, small, plan, err = _prune(model, x)
    assert small.a.out_channels == 4 and small.b.out_channels == 4 and err < 1e-5
    assert "a" not in graph.unprunable()


class ParamWidth(ScaledByWidth):
    """The width is read from a parameter's shape (a's filters) instead of an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x)) / self.a.weight.shape[0]
        return self.c(torch.relu(self.b(y)))


def test_a_parameter_dim_used_as_a_value_keeps_that_dims_channels() -> None:
    torch.manual_seed(0)
    model = ParamWidth(None).eval()
    x = torch.randn(1, 3, 8, 8)
    graph, small, plan, err = _prune(model, x)
    assert small.a.out_channels == 8 and small.b.out_channels == 4 and err < 1e-5
    assert "dim 0 of 'a.weight'" in graph.unprunable()["a"][0]


def test_tagged_arithmetic_agrees_with_plain_numbers_and_keeps_the_tags() -> None:
    tag = SizeTag(np.array([[1], [2]]), "test")
    c = tagged(12, (tag,))
    cases = [(c // 4, 12 // 4), (c ** -0.5, 12 ** -0.5), (3 * c, 36), (1 / c, 1 / 12), (c - 2, 10), (-c, -12),
             (c % 5, 2), (2 ** c, 2 ** 12), (round(c ** 0.5), round(12 ** 0.5)), (math.floor(c / 5), 2)]
    for got, want in cases:
        assert got == want and type(got) in (SizeInt, SizeFloat) and tags_of(got) == (tag,)
    assert tags_of(c + c) == (tag,)  # one read counted once
    assert type(c > 3) is bool and tags_of(tagged(True, (tag,))) == ()


class Attention(nn.Module):
    """Written like torchvision's Swin attention: the head width is ``C // num_heads`` and the
    output is reshaped to ``C``, with ``C`` read from the input (the residual width)."""

    def __init__(self, dim: int, heads: int, fused: bool = False, swin: bool = False, rotary: bool = False) -> None:
        super().__init__()
        self.num_heads, self.fused, self.swin, self.rotary = heads, fused, swin, rotary
        if rotary:  # one table for every head's dims, like rotary embeddings' cos
            self.register_buffer("freq", torch.rand(dim // heads))
        self.context = dim  # equal to C by chance: the sizes read from x must not rewrite it
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if swin:  # a relative-position table with rows the 5-token inputs never gather
            self.table = nn.Parameter(torch.randn(13, heads))
            pos = torch.arange(7)
            self.register_buffer("index", pos[:, None] - pos[None, :] + 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # Fused like pvt_v2: the head width is inferred, only the output reshape reads C.
        head_dim = -1 if self.fused else C // self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.rotary:
            q, k = q * torch.cos(self.freq), k * torch.cos(self.freq)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.swin:  # torchvision's Swin: the scale is computed from C, and a biased logit
            q = q * (C // self.num_heads) ** -0.5
            bias = self.table[self.index[:N, :N].reshape(-1)].view(N, N, -1).permute(2, 0, 1)
            out = (q @ k.transpose(-2, -1) + bias).softmax(-1) @ v
        else:
            out = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Transformer(nn.Module):
    """Two residual attention + MLP blocks (no LayerNorm, so the masked reference is exact)."""

    def __init__(self, dim: int = 24, heads: int = 3, fused: bool = False, swin: bool = False,
                 rotary: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = nn.ModuleList([Attention(dim, heads, fused, swin, rotary) for _ in range(2)])
        self.fc1 = nn.ModuleList([nn.Linear(dim, 2 * dim) for _ in range(2)])
        self.fc2 = nn.ModuleList([nn.Linear(2 * dim, dim) for _ in range(2)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for attn, fc1, fc2 in zip(self.attn, self.fc1, self.fc2):
            x = x + attn(x)
            x = x + fc2(torch.relu(fc1(x)))
        return self.head(x.mean(1))


@pytest.mark.parametrize("options", [dict(ratio=0.5), dict(ratio=0.4, global_ranking=True), dict(target_params=0.5),
                                     dict(target_flops=0.5, allocation="knapsack")],
                         ids=["ratio", "global", "params", "knapsack"])
def test_heads_and_embedding_tied_by_reshape_sizes_are_pruned_proportionally_and_exactly(options) -> None:
    torch.manual_seed(0)
    model = Transformer().eval()
    x = torch.randn(2, 5, 8)
    graph = pk.trace(model, x, ignore=["head"])
    names = {graph.groups[i].name for tie in graph.ties for i in tie}
    assert {"embed (+4 coupled)", "attn.0.qkv", "attn.1.qkv"} <= names
    small, plan = pk.prune(model, x, graph=graph, return_plan=True, **options)
    width, heads = small.embed.out_features, [a.num_heads for a in small.attn]
    # Both the residual width and the heads shrink, by the same fraction (8 channels a head).
    assert width < 24 and heads[0] < 3 and width == 8 * heads[0] == 8 * heads[1]
    assert small.attn[0].qkv.out_features == 3 * width and small.attn[0].context == 24
    assert not plan.meta["repairs"]
    (tie,) = plan.meta["ties"]
    assert tie["kept"] == pytest.approx(width / 24, abs=1e-4) and "attn.0.qkv" in tie["groups"]
    ref = masked_reference(model, graph, plan)
    with torch.no_grad():
        assert torch.allclose(small(x), ref(x), atol=1e-5)
    if "target_params" in options:
        assert 0.45 <= pk.measure.count_params(small) / pk.measure.count_params(model) <= 0.5


def test_one_fused_head_keeps_the_width_it_is_reshaped_to() -> None:
    # Fused attention makes a head one channel (its label is one atom): it cannot shrink, so
    # reshape(B, N, C) keeps the embedding whole instead of failing validation.
    torch.manual_seed(0)
    model = Transformer(dim=8, heads=1, fused=True).eval()
    x = torch.randn(2, 5, 8)
    graph = pk.trace(model, x, ignore=["head"])
    small, plan = pk.prune(model, x, graph=graph, ratio=0.5, return_plan=True)
    assert small.embed.out_features == 8 and small.attn[0].qkv.out_features == 24
    assert small.fc1[0].out_features == 8 and not plan.meta["repairs"]
    with torch.no_grad():
        assert torch.allclose(small(x), masked_reference(model, graph, plan)(x), atol=1e-5)


def test_a_table_shared_by_every_head_leaves_the_heads_separable() -> None:
    # cos(freq) multiplies dim j of every head: it must not tie the heads' dims together
    # (then no head could go); whole heads go, the table stays whole, exactly.
    torch.manual_seed(0)
    model = Transformer(rotary=True).eval()
    x = torch.randn(2, 5, 8)
    graph = pk.trace(model, x, ignore=["head"])
    small, plan = pk.prune(model, x, graph=graph, ratio=0.5, return_plan=True)
    heads = small.attn[0].num_heads
    assert heads < 3 and small.embed.out_features == 8 * heads and small.attn[0].freq.shape == (8,)
    assert not plan.meta["repairs"]
    with torch.no_grad():
        assert torch.allclose(small(x), masked_reference(model, graph, plan)(x), atol=1e-5)


@pytest.mark.parametrize("options", [dict(ratio=0.5), dict(target_flops=0.5, allocation="knapsack")],
                         ids=["ratio", "knapsack"])
def test_a_scale_from_c_over_num_heads_survives_whole_heads_pruned_with_their_embedding(options) -> None:
    # q * (C // num_heads) ** -0.5 uses the residual width as a value; whole heads and the
    # same fraction of the embedding leave the quotient (the head width) as it was, so
    # nothing is kept whole. The relative-position table's never-gathered rows (6 of 13)
    # do not stop its head columns from being sliced either.
    torch.manual_seed(0)
    model = Transformer(swin=True).eval()
    x = torch.randn(2, 5, 8)
    graph = pk.trace(model, x, ignore=["head"])
    assert not graph.unprunable() or set(graph.unprunable()) == {"head"}
    small, plan = pk.prune(model, x, graph=graph, return_plan=True, **options)
    heads = small.attn[0].num_heads
    assert small.embed.out_features == 8 * heads < 24 and small.attn[0].table.shape == (13, heads)
    assert not plan.meta["repairs"]
    with torch.no_grad():
        assert torch.allclose(small(x), masked_reference(model, graph, plan)(x), atol=1e-5)


class SplitScale(ScaledByWidth):
    """``y * (C // self.parts) ** -0.5``: a quotient by an attribute no reshape rewrites."""

    def __init__(self) -> None:
        super().__init__(None)
        self.parts = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = y * (y.shape[1] // self.parts) ** -0.5
        return self.c(torch.relu(self.b(y)))


def test_a_quotient_the_prune_would_change_keeps_its_channels_and_says_why() -> None:
    torch.manual_seed(0)
    model = SplitScale().eval()
    x = torch.randn(1, 3, 8, 8)
    graph, small, plan, err = _prune(model, x)
    # Halving a's 8 channels would make 8 // 2 = 4 into 2: a stays, b is pruned, exactly.
    assert small.a.out_channels == 8 and small.b.out_channels == 4 and small.parts == 2 and err < 1e-5
    (repair,) = plan.meta["repairs"]
    assert repair.startswith("a:") and "changes its quotient by 'parts'" in repair and "'mul'" in repair
