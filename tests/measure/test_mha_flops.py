"""FLOPs of nn.MultiheadAttention are counted in eval mode (its fused fast path is not)."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.measure import count_flops


class Block(nn.Module):
    def __init__(self, e: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_mha_flops_match_hand_count() -> None:
    e, heads, length = 32, 4, 10
    model = Block(e, heads).eval()
    x = torch.randn(1, length, e)
    # q/k/v projections + q k^T + attn v + output projection, 2 FLOPs per multiply-add
    expected = 2 * length * e * 3 * e + 2 * length * length * e + 2 * length * length * e + 2 * length * e * e
    assert count_flops(model, x) == expected
    assert torch.backends.mha.get_fastpath_enabled()  # restored
