"""Where activation criteria read a channel (its activation output), and fallbacks reported in plan.meta."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit import criteria


def _conv_bn_relu_pool() -> nn.Sequential:
    """conv -> BN -> ReLU (in place) -> max-pool -> conv -> mean -> linear: the pooled map the
    second conv consumes has fewer zeros than the ReLU output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(4, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([-0.8, -0.3, 0.0, 0.5]))  # channels from mostly-zero to mostly-live
    return model.eval()


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _relu_out(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The ReLU output by hand: conv, eval-mode BN from its statistics and affine, clamp at 0."""
    conv, bn = model[0], model[1]
    z = F.conv2d(x, conv.weight, conv.bias, padding=1)
    z = (z - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    return (z * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).clamp(min=0)


def _group(model: nn.Module, name: str):
    graph = pk.trace(model, torch.randn(1, 2, 8, 8))
    return graph, [g for g in graph.groups if g.name == name][0]


def test_apoz_and_mean_activation_are_read_at_the_relu_output_not_after_pooling() -> None:
    model = _conv_bn_relu_pool()
    graph, group = _group(model, "0")
    batches = _batches()
    with torch.no_grad():
        acts = [_relu_out(model, x) for x, _ in batches]
    at_relu = sum((a != 0).double().mean((0, 2, 3)) for a in acts).numpy()
    after_pool = sum((F.max_pool2d(a, 2) != 0).double().mean((0, 2, 3)) for a in acts).numpy()
    # The premise: the two readings differ on this net (pooling hides zeros).
    assert np.abs(at_relu - after_pool).max() > 0.1
    fallbacks: dict[str, str] = {}
    got = criteria.score_groups(model, [group], "apoz", loader=batches, fallbacks=fallbacks)[0]
    np.testing.assert_allclose(got, at_relu, rtol=1e-6)
    assert not np.allclose(got, after_pool, atol=0.05)
    assert fallbacks == {}
    mean_abs = sum(a.abs().mean((0, 2, 3)) for a in acts).numpy()
    np.testing.assert_allclose(criteria.score_groups(model, [group], "activation", loader=batches)[0], mean_abs,
                               rtol=1e-5)


def test_activation_taylor_is_read_at_the_relu_output() -> None:
    model = _conv_bn_relu_pool()
    _, group = _group(model, "0")
    batches = _batches()
    expected = np.zeros(4)
    for x, y in batches:
        a = _relu_out(model, x).detach().requires_grad_(True)
        rest = model[7](model[4](F.max_pool2d(a, 2)).mean((2, 3)))
        F.cross_entropy(rest, y).backward()
        expected += (a * a.grad).flatten(2).mean(2).abs().mean(0).detach().numpy()
    got = criteria.score_groups(model, [group], "taylor_act", loader=batches)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)


class _SharedReLU(nn.Module):
    """One ReLU module called after two convs (as torchvision's BasicBlock reuses its ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 3, 1)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.c1.bias.fill_(-0.3)
            self.c2.bias.fill_(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(F.max_pool2d(self.act(self.c2(F.max_pool2d(self.act(self.c1(x)), 2))), 2)).mean((2, 3))


def test_a_reused_activation_module_is_matched_to_each_call() -> None:
    model = _SharedReLU().eval()
    graph = pk.trace(model, torch.randn(1, 2, 8, 8))
    groups = [g for g in graph.groups if g.name in ("c1", "c2")]
    batches = _batches()
    got = dict(zip((g.name for g in groups), criteria.score_groups(model, groups, "apoz", loader=batches)))
    e1, e2 = np.zeros(4), np.zeros(4)
    with torch.no_grad():
        for x, _ in batches:
            a1 = (F.conv2d(x, model.c1.weight, model.c1.bias)).clamp(min=0)
            a2 = (F.conv2d(F.max_pool2d(a1, 2), model.c2.weight, model.c2.bias)).clamp(min=0)
            e1 += (a1 != 0).double().mean((0, 2, 3)).numpy()
            e2 += (a2 != 0).double().mean((0, 2, 3)).numpy()
    np.testing.assert_allclose(got["c1"], e1, rtol=1e-6)
    np.testing.assert_allclose(got["c2"], e2, rtol=1e-6)


class _FunctionalReLU(nn.Module):
    """conv -> torch.relu (a function, not a module) -> max-pool -> conv: no activation module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(torch.relu(self.conv(x)), 2)).mean((2, 3))


def test_without_an_activation_module_apoz_falls_back_to_the_consumer_input_and_says_so() -> None:
    model = _FunctionalReLU().eval()
    batches = _batches()
    with torch.no_grad():
        pooled = [F.max_pool2d(torch.relu(model.conv(x)), 2) for x, _ in batches]
    after_pool = sum((p != 0).double().mean((0, 2, 3)) for p in pooled).numpy()
    _, group = _group(model, "conv")
    np.testing.assert_allclose(criteria.score_groups(model, [group], "apoz", loader=batches)[0], after_pool,
                               rtol=1e-6)
    _, plan = pk.prune(model, torch.randn(1, 2, 8, 8), ratio=0.25, criterion="apoz", ignore=["head"],
                       criterion_kwargs={"loader": batches}, return_plan=True)
    assert plan.meta["criterion_fallbacks"] == {
        "conv": "apoz: activation statistics read at the consumer input: no activation module takes the output "
                "of 'conv'"}


def test_the_plan_names_exactly_the_groups_read_off_their_activation_output() -> None:
    """Group '0' (conv -> BN -> ReLU) is read at its ReLU; group '4' (conv -> avg-pool ->
    linear) has no activation module and is read at the linear's input."""
    model = _conv_bn_relu_pool()
    _, plan = pk.prune(model, torch.randn(1, 2, 8, 8), ratio=0.25, criterion="apoz", ignore=["7"],
                       criterion_kwargs={"loader": _batches()}, return_plan=True)
    assert plan.meta["criterion_fallbacks"] == {
        "4": "apoz: activation statistics read at the consumer input: no activation module takes the output of '4'"}


def test_bn_without_a_norm_falls_back_to_l2_and_the_plan_says_so() -> None:
    model = _FunctionalReLU().eval()
    _, group = _group(model, "conv")
    fallbacks: dict[str, str] = {}
    np.testing.assert_allclose(criteria.score_groups(model, [group], "bn", fallbacks=fallbacks)[0],
                               criteria.get("l2")(model, group))
    assert fallbacks == {"conv": "bn -> l2: no normalisation layer"}
    _, plan = pk.prune(model, torch.randn(1, 2, 8, 8), ratio=0.25, criterion="bn", ignore=["head"],
                       return_plan=True)
    assert plan.meta["criterion_fallbacks"] == {"conv": "bn -> l2: no normalisation layer"}
    # Only the group without a BN falls back: '0' has one, '4' (conv -> pool -> linear) none.
    _, plan = pk.prune(_conv_bn_relu_pool(), torch.randn(1, 2, 8, 8), ratio=0.25, criterion="bn", ignore=["7"],
                       return_plan=True)
    assert plan.meta["criterion_fallbacks"] == {"4": "bn -> l2: no normalisation layer"}


def test_l2_out_is_the_filter_l2_norm() -> None:
    """Hand computation: sqrt of the sum of squares of each producer filter (weight row and
    bias are the conv's 'out' members), nothing of the consumer."""
    conv, head = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5], [3.0, 0.0]]).view(3, 2, 1, 1))
        conv.bias.copy_(torch.tensor([2.0, 0.0, -4.0]))
        head.weight.fill_(7.0)
    model = nn.Sequential(conv, nn.ReLU(), head).eval()
    graph = pk.trace(model, torch.randn(1, 2, 4, 4))
    group = [g for g in graph.groups if g.name == "0"][0]
    # filter c: its weight row and its bias entry (both 'out' members); the head's 7s are not counted
    np.testing.assert_allclose(criteria.get("l2_out")(model, group), np.sqrt([1 + 4 + 4, 0.25 + 0.25 + 0, 9 + 0 + 16]))
    assert "l2_out" in criteria.list_criteria()


def test_attention_heads_no_site_sees_fall_back_to_l2() -> None:
    """nn.MultiheadAttention's heads exist only inside its fused call (out_proj, their
    consumer, never runs its own forward): activation criteria score them by l2, reported,
    instead of all-zero statistics."""
    torch.manual_seed(0)
    embed, attn = nn.Linear(6, 16), nn.MultiheadAttention(16, 4, batch_first=True)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn, self.head = embed, attn, nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))

    model = Model().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 5, 6, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    graph = pk.trace(model, batches[0][0])
    heads = [grp for grp in graph.groups if grp.name == "attn"]
    for name in ("activation", "apoz", "taylor_act", "functionality"):
        fallbacks: dict[str, str] = {}
        scores = criteria.score_groups(model, heads, name, loader=batches, batches=2, fallbacks=fallbacks)
        want = criteria.score_groups(model, heads, "l2")
        np.testing.assert_allclose(scores[0], want[0])
        assert fallbacks["attn"].startswith(f"{name} -> l2")
