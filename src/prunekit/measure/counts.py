"""Parameter and FLOP counting.

``example_inputs`` follow :func:`prunekit.runtime.call_model`'s conventions: a tensor, a
tuple/list of positional arguments, a dict of keyword arguments, or any other single argument.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.runtime import call, call_model, infer_device, model_mode, to_device

__all__ = ["count_params", "count_flops", "count_flops_meta_first"]

logger = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Count the model's parameters, each shared/tied tensor counted once.

    ``nn.Module.parameters()`` already drops repeated ``Parameter`` objects (e.g.
    ``head.weight = embed.weight``); on top of that, distinct ``Parameter``
    objects that are the same view of the same storage are also counted once.
    Buffers (e.g. BatchNorm running statistics) are not parameters and are not
    counted.

    Returns:
        The number of unique scalar parameters.
    """
    total = 0
    seen_views: set[tuple[Any, ...]] = set()
    for p in model.parameters():
        n = p.numel()
        # Meta / empty tensors have no real storage address to deduplicate by.
        if n > 0 and p.device.type != "meta":
            key = (
                p.device,
                p.untyped_storage().data_ptr(),
                p.storage_offset(),
                tuple(p.shape),
                p.stride(),
            )
            if key in seen_views:
                continue
            seen_views.add(key)
        total += n
    return total


def _register_cpu_attention_flops() -> None:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU one that
    ``F.scaled_dot_product_attention`` dispatches to; count it with the same formula."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return
    # sdpa_flop is already wrapped to take shapes: register it raw.
    flop_counter.register_flop_formula(op, get_raw=True)(flop_counter.sdpa_flop)


def count_flops(model: nn.Module, example_inputs: Any, *, meta: bool = False) -> int:
    """Count the FLOPs of one forward pass with ``torch.utils.flop_counter``.

    The forward runs once under ``torch.no_grad()`` with the model in eval mode;
    every submodule's train/eval flag is restored afterwards. FLOPs are counted
    the way ``FlopCounterMode`` does: 2 per multiply-add of matmul/convolution-like
    ops (addmm, mm, bmm, convolution, attention, ...). Element-wise and
    normalisation ops (bias adds inside conv, BatchNorm, activations, pooling)
    count as 0. ``nn.MultiheadAttention`` is counted through its decomposed path (its
    fused fast path would count as 0). Inputs are moved to the model's device first.
    With ``meta`` the forward runs on meta-device stand-ins (no arithmetic): the same
    count in a fraction of the time, for models whose forward the meta device can run.

    Returns:
        Total FLOPs of one forward pass, as an ``int``.
    """
    _register_cpu_attention_flops()
    if meta:
        from prunekit.graph.meta import meta_tensors, to_meta

        swapped, meta_inputs = meta_tensors(model), to_meta(example_inputs)

        def run() -> None:
            call(model, meta_inputs, swapped)
    else:
        inputs = to_device(example_inputs, infer_device(model, example_inputs))

        def run() -> None:
            call_model(model, inputs)
    # nn.MultiheadAttention's fused eval fast path is invisible to FlopCounterMode; the
    # decomposed path computes the same thing and is counted.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with model_mode(model, "eval"), torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                run()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    flops = int(counter.get_total_flops())
    logger.debug("count_flops: %d FLOPs for %s", flops, type(model).__name__)
    return flops


def count_flops_meta_first(model: nn.Module, example_inputs: Any) -> int:
    """:func:`count_flops` on meta-device stand-ins (no arithmetic), or on real tensors for a
    model whose forward the meta device cannot run. Returns the FLOPs of one forward pass."""
    try:
        return count_flops(model, example_inputs, meta=True)
    except Exception:  # noqa: BLE001 - any meta failure falls back to real tensors
        return count_flops(model, example_inputs)
