"""Channel rules of products beyond matmul: ``addmm`` / ``baddbmm`` (HF's Conv1D), ``einsum``
from its subscripts, ``fold`` after ``unfold``, and grouped-query ``scaled_dot_product_attention``.

Every test prunes for real (channels must go: a rule that blocks everything fails) and
compares with an oracle computed on the unpruned model: the masked reference (removed
channels' consumer weights zeroed) where channels are consumed by weighted layers only, and
where they are also contracted with each other (``q k^T`` over single channels) the
original with the removed channels silenced at their producers, which is what removing
them means.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.graph import DependencyGraph
from prunekit.plan import PruningPlan, SetAttr
from prunekit.surgery.reference import masked_reference


def silenced(model: nn.Module, graph: DependencyGraph, plan: PruningPlan) -> nn.Module:
    """Copy of ``model`` with every removed channel's slices zeroed in every member (producer
    rows and biases, consumer columns): the channels then carry exact zeros everywhere."""
    return masked_reference(model, graph, plan, roles=("in", "out"))


def prune_half(model: nn.Module, x: torch.Tensor, **kw) -> tuple[nn.Module, PruningPlan, DependencyGraph]:
    torch.manual_seed(0)
    model = model.eval()
    graph = pk.trace(model, x, **kw)
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert not plan.meta["repairs"], plan.meta["repairs"]
    return small, plan, graph


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- addmm / baddbmm
class Conv1D(nn.Module):
    """HF's Conv1D: ``addmm(bias, x, W)`` with ``W`` of shape (in, out) and the output width
    in an attribute ``nf`` that the forward reshapes with."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


class AddmmMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = Conv1D(6, 16), Conv1D(16, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_addmm_with_a_parameter_weight_is_a_linear_layer() -> None:
    """Oracle: the masked original. fc1's 16 and fc2's 12 outputs lose half each, the weight
    (in, out) along both dims, the bias with the outputs, ``nf`` with the width."""
    torch.manual_seed(0)
    model, x = AddmmMLP(), torch.randn(2, 5, 6)
    small, plan, graph = prune_half(model, x)
    assert tuple(small.fc1.weight.shape) == (6, 8) and tuple(small.fc1.bias.shape) == (8,)
    assert tuple(small.fc2.weight.shape) == (8, 6) and small.head.in_features == 6
    assert (small.fc1.nf, small.fc2.nf) == (8, 6)
    with torch.no_grad():
        close(small(x), masked_reference(model, graph, plan)(x))


class Baddbmm(nn.Module):
    """Scores ``baddbmm(bias, q, k^T)`` (a learned (n, n) bias broadcast over the batch),
    attention over values, a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(8, 10), nn.Linear(10, 3)
        self.bias = nn.Parameter(torch.randn(1, 5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.baddbmm(self.bias, self.q(x), self.k(x).transpose(1, 2), alpha=0.5)
        return self.o(scores.softmax(-1) @ self.v(x))


def test_baddbmm_contracts_q_with_k_and_adds_its_input() -> None:
    """Oracle: the original with removed channels silenced at their producers. q and k are
    contracted, so they form one group and lose the same channels."""
    torch.manual_seed(0)
    model, x = Baddbmm(), torch.randn(2, 5, 8)
    small, plan, graph = prune_half(model, x)
    (qk,) = graph.groups_of("q")
    assert "k" in qk.modules() and qk.n_prunable == 12
    assert plan.keep["q.weight"][0] == plan.keep["k.weight"][0] and len(plan.keep["q.weight"][0]) == 6
    assert small.v.out_features == 5 and small.o.in_features == 5
    with torch.no_grad():
        close(small(x), silenced(model, graph, plan)(x))


# --------------------------------------------------------------------------- einsum
class EinsumAttention(nn.Module):
    """A linear layer as ``"bnc,dc->bnd"`` with a raw parameter, multi-head attention with
    heads on a batch letter (``bqhd,bkhd->bhqk``, then ``bhqk,bkhd->bqhd``), an outer product
    with an untracked operand and a sum over a letter, all in einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.w = nn.Parameter(torch.randn(12, 16) / 4)
        self.q, self.k, self.v = nn.Linear(12, 16), nn.Linear(12, 16), nn.Linear(12, 16)
        self.mix = nn.Linear(16, 8)
        self.head = nn.Linear(8 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = torch.relu(torch.einsum("bnc,dc->bnd", self.inp(x), self.w))
        q, k, v = (f(h).view(b, n, -1, 4) for f in (self.q, self.k, self.v))
        att = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        y = self.mix(torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, -1))  # (b, n, 8)
        pooled = torch.einsum("bnc->bc", y)  # a sum over tokens keeps the channels
        basis = torch.linspace(-1, 1, 3, device=x.device).expand(b, 3)  # untracked
        return self.head(torch.einsum("bc,bj->bcj", pooled, basis).flatten(1))


def test_einsum_layers_heads_outer_products_and_sums() -> None:
    """Oracle: the masked original. The parameter ``w`` is a linear layer (its 12 outputs are
    a group, sliced along both dims); heads are pruned whole (4 channels each, 2 of 4 go);
    the outer product carries ``mix``'s channels into the flattened head input."""
    torch.manual_seed(0)
    model, x = EinsumAttention(), torch.randn(2, 5, 6)
    small, plan, graph = prune_half(model, x, ignore=["head"])
    assert tuple(small.w.shape) == (6, 8) and small.inp.out_features == 8
    assert small.q.in_features == small.k.in_features == 6
    kept_q = plan.keep["q.weight"][0]
    assert len(kept_q) == 8 and sorted({i // 4 for i in kept_q}) == sorted({i // 4 for i in plan.keep["v.weight"][0]})
    assert all(sum(1 for i in kept_q if i // 4 == h) in (0, 4) for h in range(4))  # whole heads
    assert small.mix.out_features == 4 and small.head.in_features == 12
    with torch.no_grad():
        close(small(x), masked_reference(model, graph, plan)(x))


class EinsumContract(nn.Module):
    """Two branches contracted channel by channel (``bnc,bmc->bnm``) and a channel sum
    (``bnc->bn``): their channels are one group and vanish from the output shape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(6, 10)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("bnc,bmc->bnm", self.a(x), self.b(x))
        total = torch.einsum("bnc->bn", self.c(x)).unsqueeze(-1)
        return self.head(scores + total)


def test_einsum_contraction_ties_both_operands_index_by_index() -> None:
    """Oracle: the original with removed channels silenced at their producers (a contraction
    or a sum over channels has no consumer weight the masked reference could zero)."""
    torch.manual_seed(0)
    model, x = EinsumContract(), torch.randn(2, 5, 6)
    small, plan, graph = prune_half(model, x)
    (ab,) = graph.groups_of("a")
    assert "b" in ab.modules() and ab.n_prunable == 10
    assert plan.keep["a.weight"][0] == plan.keep["b.weight"][0] and small.a.out_features == 5
    assert small.c.out_features == 5
    with torch.no_grad():
        close(small(x), silenced(model, graph, plan)(x))


class RelativePositions(nn.Module):
    """mvitv2's pattern: queries (4 heads) against a relative-position table gathered from a
    parameter shared by all heads (``byhwc,hkc->byhwk``), added to the attention scores."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = 4
        self.qkv = nn.Linear(8, 3 * 16)
        self.rel = nn.Parameter(torch.randn(7, 4) * 0.1)  # (2 * 4 - 1, head_dim)
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, 16 tokens = 4 x 4, 8)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, 4).permute(2, 0, 3, 1, 4)
        attn = q @ k.transpose(-2, -1)  # (b, heads, n, n)
        dist = torch.arange(4)[:, None] - torch.arange(4)[None, :] + 3
        rel = torch.einsum("byhwc,hkc->byhwk", q.reshape(b, -1, 4, 4, 4), self.rel[dist])  # (b, heads, 4, 4, 4)
        attn = (attn.view(b, -1, 4, 4, 4, 4) + rel.unsqueeze(-1)).view(b, -1, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


def test_einsum_with_a_table_shared_by_all_heads_keeps_heads_prunable() -> None:
    """The table is a fixed-size tensor against per-head queries: heads stay whole units
    and two of the four go. Oracle: the masked original."""
    torch.manual_seed(0)
    model, x = RelativePositions(), torch.randn(2, 16, 8)
    small, plan, graph = prune_half(model, x, ignore=["proj"])
    (heads,) = graph.groups_of("qkv")
    assert heads.n_prunable == 4
    assert small.qkv.out_features == 24 and small.proj.in_features == 8
    with torch.no_grad():
        close(small(x), masked_reference(model, graph, plan)(x))


# --------------------------------------------------------------------------- fold
class FoldUnfold(nn.Module):
    """Outlook-style aggregation (volo): each channel's 3x3 neighbourhood is unfolded with
    zero padding, weighted per block position by an untracked map and folded back (fold
    sums the overlapping blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        cols = F.unfold(self.conv(x), 3, padding=1)  # (b, 8 * 9, h * w)
        weights = torch.linspace(0, 1, h * w, device=x.device).view(1, 1, -1)  # untracked, per block
        return self.out(F.fold(cols * weights, (h, w), 3, padding=1))


def test_fold_sums_the_kernel_positions_of_a_channel_back_into_it() -> None:
    """Oracle: the masked original; conv keeps 4 of its 8 channels and out reads those."""
    torch.manual_seed(0)
    model, x = FoldUnfold(), torch.randn(2, 3, 6, 6)
    small, plan, graph = prune_half(model, x, ignore=["out"])
    assert small.conv.out_channels == 4 and small.out.in_channels == 4
    with torch.no_grad():
        close(small(x), masked_reference(model, graph, plan)(x))


def test_fold_of_channels_mixed_with_untracked_ones_blocks_them() -> None:
    """An output channel of fold summing a tracked and an untracked input channel cannot be
    removed: the rule blocks it (naming fold), never drops half a sum."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, 4, 6): 6 blocks of a 3x3 map
            y = self.conv(x)
            zero = torch.zeros(x.shape[0], 1, 6, device=x.device)
            cols = torch.cat([y[:, :1], zero, y[:, 1:], zero], 1)  # fold channel c = rows 2c, 2c + 1
            return F.fold(cols, (3, 3), (2, 1))

    graph = pk.trace(Mixed().eval(), torch.randn(1, 4, 6))
    (g,) = graph.groups_of("conv")
    assert g.n_prunable == 0 and any("fold" in r for r in g.reasons)


# --------------------------------------------------------------------------- grouped-query attention
class GQA(nn.Module):
    """Four query heads on two key/value heads (head_dim 4). ``eager`` repeats k and v the way
    transformers' ``repeat_kv`` does, with ``num_key_value_groups`` (2: the kv-head count, too)."""

    def __init__(self, eager: bool) -> None:
        super().__init__()
        self.eager = eager
        self.head_dim, self.num_key_value_groups = 4, 2
        self.q, self.k, self.v, self.o = nn.Linear(8, 16), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 8)

    def repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        b, kv, n, d = t.shape
        return t[:, :, None].expand(b, kv, self.num_key_value_groups, n, d).reshape(b, kv * self.num_key_value_groups, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.eager:
            y = F.scaled_dot_product_attention(q, self.repeat_kv(k), self.repeat_kv(v))
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


def test_gqa_prunes_a_kv_head_with_the_query_heads_it_serves() -> None:
    """Oracle: the masked original; and by hand, kv head j serves query heads 2j, 2j+1, so the
    query rows kept are exactly those of the kept kv head."""
    torch.manual_seed(0)
    model, x = GQA(eager=False), torch.randn(2, 5, 8)
    small, plan, graph = prune_half(model, x, ignore=["o"])
    (heads,) = graph.groups_of("q")
    assert heads.size == 2 and heads.n_prunable == 2  # one channel per kv head
    (j,) = {i // 4 for i in plan.keep["k.weight"][0]}
    assert plan.keep["q.weight"][0] == list(range(8 * j, 8 * j + 8))
    assert (small.q.out_features, small.k.out_features, small.v.out_features, small.o.in_features) == (8, 4, 4, 8)
    with torch.no_grad():
        close(small(x), masked_reference(model, graph, plan)(x))


def test_an_attribute_equal_to_a_pruned_count_is_not_rewritten() -> None:
    """Eager GQA reshapes with ``num_kv_heads * self.num_key_value_groups``, the first read from
    a shape. ``num_key_value_groups`` (2) equals the kv-head count that pruning halves, but
    it is no size of a pruned tensor: it stays 2, and the output matches the masked original."""
    torch.manual_seed(0)
    model, x = GQA(eager=True), torch.randn(2, 5, 8)
    small, plan, graph = prune_half(model, x, ignore=["o"])
    assert small.k.out_features == 4 and small.q.out_features == 8
    assert small.num_key_value_groups == 2 and type(small.num_key_value_groups) is int
    assert not [s for s in plan.steps if isinstance(s, SetAttr) and s.attr == "num_key_value_groups"]
    with torch.no_grad():
        close(small(x), masked_reference(model, graph, plan)(x))
