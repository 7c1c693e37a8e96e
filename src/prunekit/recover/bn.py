"""Re-estimating normalisation statistics after pruning (BN re-calibration).

Removing channels changes what every later layer sees, so the running mean and variance a
BatchNorm learned on the original network no longer describe its input; re-estimating them
on a few hundred training images, with no gradient step, recovers part of the loss at the cost
of a few forward passes (the "plain removal + BN re-calibration" baseline of the benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunekit.features import as_batch, call_on_device
from prunekit.handlers import handler_for
from prunekit.runtime import model_mode

__all__ = ["recalibrate_bn"]


def _running_norms(model: nn.Module) -> list[nn.Module]:
    """Norm layers (by their handler) that keep running statistics."""
    out = []
    for m in model.modules():
        h = handler_for(m)
        if h is not None and h.is_norm and getattr(m, "running_mean", None) is not None:
            out.append(m)
    return out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any]) -> int:
    """Replace, in place, the running mean/variance of every norm layer of ``model`` that
    tracks them by their plain average over ``batches`` (``(inputs, targets)`` pairs or
    inputs), as if those were the whole training set: statistics reset, ``momentum=None``
    (PyTorch's cumulative average), every other module in eval mode, no gradient. All norms
    are estimated in the same passes, each seeing the layers before it normalise with batch
    statistics, as in training (as ``torch.optim.swa_utils.update_bn`` does, which however also
    turns dropout on). Affine
    weights are untouched and each module's mode and momentum are restored. Returns the
    number of norm layers re-estimated (0 leaves the model as it was); an empty ``batches``
    raises ValueError before anything changes."""
    batches = list(batches)
    if not batches:
        raise ValueError("recalibrate_bn needs at least one batch")
    norms = _running_norms(model)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    with model_mode(model, "eval"):
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for item in batches:
                call_on_device(model, as_batch(item)[0])
        finally:
            for m, mom in zip(norms, momenta):
                m.momentum = mom
    return len(norms)
