"""Peak accelerator memory of one forward pass."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from prunekit.runtime import call_model, infer_device, model_mode, to_device

__all__ = ["peak_memory_bytes"]

logger = logging.getLogger(__name__)


def peak_memory_bytes(model: nn.Module, example_inputs: Any) -> int | None:
    """Measure peak CUDA memory allocated during one inference forward pass.

    On CUDA the allocator's peak statistics are reset, one forward runs under
    ``torch.no_grad()`` in eval mode (train/eval flags restored afterwards), and
    ``torch.cuda.max_memory_allocated`` is read. The figure includes everything
    resident on the device at the peak (weights, inputs, activations, and any
    other tensors the process holds there). Inputs are moved to the model's device
    (for a model without parameters/buffers, the first input tensor's device).

    On CPU (or any non-CUDA device) this returns ``None``: there is no reliable
    per-forward peak allocation counter there, and process RSS is dominated by
    allocator caching and unrelated objects.

    Returns:
        Peak allocated bytes on the CUDA device used, or ``None`` off CUDA.
    """
    device = infer_device(model, example_inputs)
    if device.type != "cuda":
        return None
    inputs = to_device(example_inputs, device)
    with model_mode(model, "eval"), torch.no_grad():
        # Synchronise first so pending work from before does not leak into the peak.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        call_model(model, inputs)
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
    logger.debug("peak_memory_bytes: %d bytes on %s", peak, device)
    return peak
