"""``graph.opcost.op_cost`` against ``torch.utils.flop_counter`` (via ``measure.count_flops``).

Each module below runs one kind of counted op; the oracle is FlopCounterMode's count of the
same forward, so every formula is checked against torch's own, not against itself.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.graph.opcost import op_cost
from prunekit.measure import count_flops


class Fn(nn.Module):
    """A forward given as a function of the module's parameters and the input."""

    def __init__(self, fn: Callable[..., torch.Tensor], *shapes: tuple[int, ...]) -> None:
        super().__init__()
        self.fn = fn
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(*s)) for s in shapes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.ps)


class Attention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str, int | None]] = {
    # name: (module, input shape, the op, its contracted dim)
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, stride=2), (2, 6, 9, 9), "conv2d", 1),
    "conv2d_grouped": (lambda: nn.Conv2d(6, 8, 3, groups=2), (1, 6, 7, 7), "conv2d", 1),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6), (1, 6, 7, 7), "conv2d", None),
    "conv1d": (lambda: nn.Conv1d(4, 5, 3), (2, 4, 11), "conv1d", 1),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4), "conv3d", 1),
    "linear_3d": (lambda: nn.Linear(6, 7), (2, 5, 6), "linear", -1),
    "matmul": (lambda: Fn(lambda x, w: x @ w, (6, 3)), (2, 5, 6), "matmul", -1),
    "mm": (lambda: Fn(lambda x, w: torch.mm(x, w), (6, 3)), (5, 6), "mm", -1),
    "bmm": (lambda: Fn(lambda x, w: torch.bmm(x, w), (2, 6, 3)), (2, 5, 6), "bmm", -1),
    "addmm": (lambda: Fn(lambda x, b, w: torch.addmm(b, x, w), (3,), (6, 3)), (5, 6), "addmm", None),
    "baddbmm": (lambda: Fn(lambda x, b, w: torch.baddbmm(b, x, w), (3,), (2, 6, 3)), (2, 5, 6), "baddbmm", None),
    "sdpa": (lambda: Fn(lambda x, k: F.scaled_dot_product_attention(x, k, k), (2, 7, 8)), (2, 5, 8),
             "scaled_dot_product_attention", None),
    "mha": (lambda: Attention(batch_first=True), (2, 5, 16), "multi_head_attention_forward", None),
    "mha_seq_first": (lambda: Attention(batch_first=False), (5, 2, 16), "multi_head_attention_forward", None),
    "mha_unbatched": (lambda: Attention(batch_first=False), (5, 16), "multi_head_attention_forward", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_cost_matches_flop_counter(case: str) -> None:
    build, shape, name, contract = CASES[case]
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(*shape)
    ops = pk.trace(model, x).ops("eval")
    (op,) = [o for o in ops if o.name == name]
    cost = op_cost(op)
    assert cost is not None and cost[1] == contract
    assert cost[0] == count_flops(model, x) > 0
    assert all(op_cost(o) is None for o in ops if o is not op)  # nothing else counts here


def test_uncounted_ops_have_no_cost() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    ops = pk.trace(model.eval(), torch.randn(1, 3, 4, 4)).ops("eval")
    assert ops and all(op_cost(o) is None for o in ops)
