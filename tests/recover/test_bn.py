"""BN re-calibration against statistics computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.recover import recalibrate_bn


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 2, 1),
                        nn.BatchNorm2d(2))
    with torch.no_grad():  # stale statistics, as after pruning
        net[1].running_mean.fill_(5.0)
        net[1].running_var.fill_(9.0)
    return net.eval()


def test_running_stats_equal_the_average_over_the_batches() -> None:
    net = _net()
    batches = [(torch.randn(8, 3, 6, 6) * 2 + 1, torch.zeros(8)) for _ in range(3)]
    assert recalibrate_bn(net, batches) == 2
    # Oracle: per batch, the mean and unbiased variance of conv0's output; averaged over batches
    # (PyTorch's momentum=None cumulative average weighs every batch equally).
    with torch.no_grad():
        outs = [net[0](x) for x, _ in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-5)
    # Modes and momentum restored; the dropout stayed off while the second BN was estimated.
    assert not any(m.training for m in net.modules()) and net[1].momentum == 0.1
    with torch.no_grad():
        # Every norm is estimated in the same passes, each seeing its predecessors normalise
        # with batch statistics, as in training (and torch.optim.swa_utils.update_bn).
        bn = net[1]
        second = [net[4](torch.relu(nn.functional.batch_norm(o, None, None, bn.weight, bn.bias, training=True,
                                                             eps=bn.eps))) for o in outs]
    torch.testing.assert_close(net[5].running_mean, torch.stack([o.mean((0, 2, 3)) for o in second]).mean(0),
                               rtol=1e-5, atol=1e-5)


def test_empty_batches_leave_the_model_unchanged() -> None:
    net = _net()
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(net, [])
    assert float(net[1].running_mean[0]) == 5.0
