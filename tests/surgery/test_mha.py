"""``PrunedMultiheadAttention`` computes what ``nn.MultiheadAttention`` computes (the oracle: the
stock module with the same tensors), and runs widths the stock module refuses."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from prunekit.surgery.factories import build, describe
from prunekit.surgery.mha import PrunedMultiheadAttention

OPTIONS = list(itertools.product([True, False], [True, False], [True, False], [False, True], [False, True]))


def _inputs(batch_first: bool, unbatched: bool, widths: tuple[int, int, int], length: int = 4, source: int = 3,
            cross: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def make(n: int, e: int) -> torch.Tensor:
        if unbatched:
            return torch.randn(n, e)
        return torch.randn(2, n, e) if batch_first else torch.randn(n, 2, e)

    q = make(length, widths[0])
    if not cross:
        return q, q, q
    return q, make(source, widths[1]), make(source, widths[2])


@pytest.mark.parametrize("batch_first,need_weights,average,cross,bias_kv", OPTIONS)
def test_equals_the_stock_module(batch_first: bool, need_weights: bool, average: bool, cross: bool,
                                 bias_kv: bool) -> None:
    torch.manual_seed(0)
    kw = {"kdim": 6, "vdim": 5} if cross else {}
    stock = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=bias_kv, add_zero_attn=bias_kv, **kw).eval()
    ours = PrunedMultiheadAttention.from_module(stock).eval()
    for unbatched, masks in ((False, False), (False, True), (True, False)):
        q, k, v = _inputs(batch_first, unbatched, (8, 6, 5), cross=cross)
        extra = {}
        if masks:
            s = k.shape[1] if batch_first else k.shape[0]
            extra = {"key_padding_mask": torch.arange(s).expand(2, s) >= s - 1, "attn_mask": torch.randn(4, s)}
        with torch.no_grad():
            want = stock(q, k, v, need_weights=need_weights, average_attn_weights=average, **extra)
            got = ours(q, k, v, need_weights=need_weights, average_attn_weights=average, **extra)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        if need_weights:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        else:
            assert got[1] is None and want[1] is None


def test_independent_widths_equal_the_zero_padded_stock_module() -> None:
    """A module with 3 heads of 4 over a 10-wide embedding writing 7 outputs equals a stock
    16-wide, 4-head module whose extra embedding channels, head and outputs are zero."""
    torch.manual_seed(0)
    ours = PrunedMultiheadAttention(10, 3, head_dim=4, out_dim=7, batch_first=True).eval()
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    stock = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    rows = torch.cat([torch.arange(12) + 16 * i for i in range(3)])
    with torch.no_grad():
        stock.in_proj_weight.zero_()
        stock.in_proj_bias.zero_()
        stock.out_proj.weight.zero_()
        stock.out_proj.bias.zero_()
        stock.in_proj_weight[rows, :10] = ours.in_proj_weight
        stock.in_proj_bias[rows] = ours.in_proj_bias
        stock.out_proj.weight[:7, :12] = ours.out_proj.weight
        stock.out_proj.bias[:7] = ours.out_proj.bias
    x = torch.randn(2, 5, 10)
    padded = torch.cat([x, torch.zeros(2, 5, 6)], -1)
    with torch.no_grad():
        got, w = ours(x, x, x)
        want, w_stock = stock(padded, padded, padded, average_attn_weights=False)
    torch.testing.assert_close(got, want[..., :7])
    torch.testing.assert_close(w, w_stock[:, :3].mean(1))  # the padding head is not one of ours


def test_factory_rebuilds_it() -> None:
    m = PrunedMultiheadAttention(10, 3, head_dim=4, kdim=6, vdim=5, out_dim=7, packed=False, add_bias_kv=True)
    name, args = describe(m)
    new = build(name, args)
    assert name == "multihead_attention" and describe(new) == (name, args)
    assert {k: tuple(v.shape) for k, v in new.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert tuple(new.q_proj_weight.shape) == (12, 10) and tuple(new.k_proj_weight.shape) == (12, 6)
    assert not new._qkv_same_embed_dim  # fused kernels (TransformerEncoderLayer's fast path) stay away


def test_transformer_encoder_layer_fast_path_does_not_take_it() -> None:
    """nn.TransformerEncoderLayer's fused eval path assumes stock widths; with ours in place (two
    of four heads left: an even count, which the fused path would take) it runs its general
    path, which calls our module. Oracle: the stock layer with the removed heads'
    output-projection columns zeroed."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 4, dim_feedforward=16, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 5, 8)
    stock = layer.self_attn
    ours = PrunedMultiheadAttention(8, 2, head_dim=2, batch_first=True).eval()
    rows = torch.cat([torch.arange(4) + 8 * i for i in range(3)])  # heads 0 and 1 of q, k and v
    with torch.no_grad():
        ours.in_proj_weight.copy_(stock.in_proj_weight[rows])
        ours.in_proj_bias.copy_(stock.in_proj_bias[rows])
        ours.out_proj.weight.copy_(stock.out_proj.weight[:, :4])
        ours.out_proj.bias.copy_(stock.out_proj.bias)
        stock.out_proj.weight[:, 4:] = 0
        want = layer(x)
        layer.self_attn = ours
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
