"""The conv handler on a depthwise conv with a channel multiplier (``groups == C_in``,
``C_out = k * C_in``): input channel ``c`` and its outputs ``c*k .. c*k+k-1`` go together."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.handlers import handler_for
from prunekit.surgery import fix_module_attrs


def _conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(4, 12, 3, padding=1, groups=4).eval()  # k = 3


def test_slicing_inputs_keeps_their_output_blocks_and_the_multiplier() -> None:
    conv, x = _conv(), torch.randn(2, 4, 5, 5)
    y = conv(x)
    keep = torch.tensor([1, 3])
    handler_for(conv).slice(conv, "in", keep)
    assert (conv.in_channels, conv.out_channels, conv.groups) == (2, 6, 2)
    blocks = torch.tensor([3, 4, 5, 9, 10, 11])
    torch.testing.assert_close(conv(x.index_select(1, keep)), y.index_select(1, blocks))


def test_fix_attrs_after_slicing_the_weight() -> None:
    conv, x = _conv(), torch.randn(2, 4, 5, 5)
    y = conv(x)
    blocks = torch.tensor([0, 1, 2, 6, 7, 8])  # inputs 0 and 2
    old = {id(conv): handler_for(conv).snapshot_attrs(conv)}
    conv.weight = nn.Parameter(conv.weight.detach()[blocks])
    conv.bias = nn.Parameter(conv.bias.detach()[blocks])
    fix_module_attrs(conv, old)
    assert (conv.in_channels, conv.out_channels, conv.groups) == (2, 6, 2)
    torch.testing.assert_close(conv(x[:, [0, 2]]), y.index_select(1, blocks))


def test_outputs_must_come_in_whole_blocks() -> None:
    conv = _conv()
    with pytest.raises(ValueError, match="whole blocks"):
        handler_for(conv).slice(conv, "out", torch.tensor([0, 1, 3]))
    handler_for(conv).slice(conv, "out", torch.tensor([3, 4, 5]))
    assert (conv.in_channels, conv.out_channels, conv.groups) == (1, 3, 1)


def test_resized_keeps_the_multiplier() -> None:
    new = handler_for(_conv()).resized(_conv(), 1.0, 0.5)
    assert (new.in_channels, new.out_channels, new.groups) == (2, 6, 2)
