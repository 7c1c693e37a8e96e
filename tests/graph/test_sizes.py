"""Sizes read from tensors in forward: used as values they keep their channels (the result
stays exact), used as sizes they are rewritten by pruning as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
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
