"""The handler answers fusion needs: the identity kernel of a conv and the eval affine of a norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.handlers import handler_for


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 6, 3, padding=1),
    nn.Conv2d(6, 6, 3, padding=1, groups=3),
    nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise
    nn.Conv2d(6, 6, 5, padding=4, dilation=2, padding_mode="reflect"),
    nn.Conv2d(6, 6, (1, 3), padding=(0, 1)),
    nn.Conv2d(6, 6, 3, padding="same"),
    nn.Conv2d(6, 6, 1),
    nn.Conv1d(6, 6, 3, padding=1),
    nn.Conv3d(6, 6, 3, padding=1, groups=2),
], ids=lambda c: repr(c))
def test_identity_weight_copies_the_input(conv: nn.Module) -> None:
    eye = handler_for(conv).identity_weight(conv)
    assert eye is not None and eye.shape == conv.weight.shape
    with torch.no_grad():
        conv.weight.copy_(eye)
        if conv.bias is not None:
            conv.bias.zero_()
    x = torch.randn(2, 6, *([7] * len(conv.kernel_size)))
    torch.testing.assert_close(conv(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 6, 3, padding=1, stride=2),
    nn.Conv2d(6, 6, 2, padding=1),  # even kernel: no centre tap
    nn.Conv2d(6, 8, 3, padding=1),  # widening
    nn.Conv2d(6, 6, 3, padding=0),  # shrinks the map
    nn.Conv2d(6, 6, 3, padding=2),  # grows it
    nn.ConvTranspose2d(6, 6, 3, padding=1),
], ids=lambda c: repr(c))
def test_no_identity_weight_where_no_kernel_is_the_identity(conv: nn.Module) -> None:
    assert handler_for(conv).identity_weight(conv) is None


def test_batch_norm_eval_affine_is_its_eval_function() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    scale, shift = handler_for(bn).eval_affine(bn)
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x))
    plain = nn.BatchNorm1d(5, affine=False).eval()
    a, c = handler_for(plain).eval_affine(plain)
    torch.testing.assert_close(a, torch.rsqrt(torch.ones(5) + plain.eps))
    torch.testing.assert_close(c, torch.zeros(5))


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(4, track_running_stats=False), nn.GroupNorm(2, 4), nn.LayerNorm(4),
                                  nn.InstanceNorm2d(4, affine=True)], ids=lambda n: type(n).__name__)
def test_norms_that_read_their_input_have_no_eval_affine(norm: nn.Module) -> None:
    assert handler_for(norm).eval_affine(norm) is None
