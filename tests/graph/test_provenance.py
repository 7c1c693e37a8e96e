"""Size provenance: which attribute a traced size came from decides the attribute fixes.

Oracles: hand-computed arithmetic for :class:`AttrInt` / :class:`ShapeInt`; for the models,
the pruned output against the masked original, and the attribute values a hand count gives.
"""

from __future__ import annotations

import copy
import pickle

import torch
from torch import nn

import prunekit as pk
from prunekit.graph.provenance import AttrInt, ShapeInt, mark_attributes
from prunekit.plan import SetAttr
from prunekit.surgery.reference import masked_reference


def test_attribute_arithmetic_keeps_its_source_and_solves_back() -> None:
    heads = AttrInt(4, "attn", "num_heads")
    assert heads * 2 == 8 and (heads * 2).attr == "num_heads" and (heads * 2).solve(6) == 3
    assert (2 * heads).solve(5) is None  # no integer attribute gives 5
    split = AttrInt(12, "blk", "expand_chs") // 2
    assert split == 6 and split.solve(4) == 8
    shifted = AttrInt(10, "m", "width") - 3
    assert shifted == 7 and shifted.solve(5) == 8
    # a product of two attributes is ambiguous; a constant over an attribute is no attribute's size
    assert not isinstance(AttrInt(4, "a", "x") * AttrInt(3, "a", "y"), AttrInt)
    assert not isinstance(12 // AttrInt(4, "a", "x"), AttrInt)


def test_anything_computed_with_a_shape_is_a_shape() -> None:
    kv = ShapeInt(2)
    groups = AttrInt(2, "attn", "num_key_value_groups")
    for value in (kv * groups, groups * kv, kv + groups, groups // kv, kv - 1, -kv):
        assert isinstance(value, ShapeInt) and not isinstance(value, AttrInt)
    assert type(pickle.loads(pickle.dumps(kv))) is int and type(copy.deepcopy(groups)) is int


class ReadsSizes(nn.Module):
    """Reads sizes of a conv output (channels along dim 1 only) and of its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        reads = (y.shape[1], y.size(1), y.numel(), self.conv.weight.shape[1], y.shape[0], y.size(2), x.shape[1])
        self.kinds = [isinstance(v, ShapeInt) for v in reads]
        return y


def test_sizes_read_along_channel_dims_are_shapes_the_others_constants() -> None:
    model = ReadsSizes()
    pk.trace(model, torch.randn(2, 3, 5, 5), modes=("eval",))
    # channel dim, size(1), numel, a parameter's dim | batch, space, the untracked input's channels
    assert model.kinds == [True, True, True, True, False, False, False]


def test_marks_are_removed_after_the_pass() -> None:
    mod = nn.Linear(3, 4)
    mod.sizes = [2, 2]
    with mark_attributes({id(mod): "fc"}, [mod]):
        assert isinstance(mod.in_features, AttrInt) and mod.in_features.module == "fc"
        assert mod.sizes[1].index == 1
        mod.cached = mod.out_features * 2  # a marked value stored by the forward
    assert type(mod.in_features) is int and mod.sizes == [2, 2] and type(mod.sizes[0]) is int
    assert type(mod.cached) is int and mod.cached == 8


class HalfSplit(nn.Module):
    """cspnet's ``x.split(self.expand_chs // 2)``, explicit split sizes in a list attribute, and an
    unrelated attribute equal to a width pruning changes, next to a view by a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.expand_chs, self.sizes, self.unrelated = 8, [6, 4], 4
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 10, 1)
        self.ca, self.cb, self.cc, self.cd = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(6, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1, y2 = self.a(x).split(self.expand_chs // 2, dim=1)
        z1, z2 = torch.split(self.b(x), self.sizes, 1)
        n, c = y1.shape[:2]
        y1 = y1.view(n, c, *x.shape[2:])  # a view by sizes read from tensors
        return self.ca(y1) + self.cb(y2) + self.cc(z1) + self.cd(z2)


def test_split_sizes_follow_their_attributes_and_nothing_else_changes() -> None:
    """By hand: the halves of ``a`` are tied position by position, so ``a`` keeps 4 of 8 and
    ``expand_chs`` becomes 4; ``b``'s two pieces lose what its ranking takes from each and the
    list entries count what each keeps; ``unrelated`` (4: the old width of a viewed half) is
    no size of anything and stays."""
    torch.manual_seed(0)
    model, x = HalfSplit().eval(), torch.randn(2, 3, 4, 4)
    graph = pk.trace(model, x, ignore=["ca", "cb", "cc", "cd"])
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert not plan.meta["repairs"]
    assert small.a.out_channels == 4 and small.expand_chs == 4
    kept_b = plan.keep["b.weight"][0]
    assert small.b.out_channels == 5 and small.sizes == [sum(i < 6 for i in kept_b), sum(i >= 6 for i in kept_b)]
    assert small.unrelated == 4 and not [s for s in plan.steps if isinstance(s, SetAttr) and s.attr == "unrelated"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_reference(model, graph, plan)(x), rtol=0, atol=1e-5)


class HeadsInBatch(nn.Module):
    """Attention that folds heads into the batch dim: ``reshape(b * self.heads, n, d)`` with
    ``b`` read from the input (a dim pruning never changes, so a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = 4
        self.qkv, self.proj = nn.Linear(8, 3 * 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, 4).transpose(1, 2).reshape(b * self.heads, n, 4)
                   for t in self.qkv(x).chunk(3, -1))
        y = torch.bmm((q @ k.transpose(1, 2)).softmax(-1), v)
        return self.proj(y.reshape(b, self.heads, n, 4).transpose(1, 2).reshape(b, n, -1))


def test_an_attribute_times_a_batch_size_is_solved_back() -> None:
    """By hand: 2 of 4 heads go, so ``heads`` becomes 2 (``b * heads`` = 4 with b = 2 solves to
    2); the output equals the masked original."""
    torch.manual_seed(0)
    model, x = HeadsInBatch().eval(), torch.randn(2, 5, 8)
    graph = pk.trace(model, x, ignore=["proj"])
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert not plan.meta["repairs"] and small.heads == 2 and small.qkv.out_features == 24
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_reference(model, graph, plan)(x), rtol=0, atol=1e-5)
