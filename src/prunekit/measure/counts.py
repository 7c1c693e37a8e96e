"""Parameter and FLOP counting, plus the shared helpers every measurement uses.

``example_inputs`` throughout :mod:`prunekit.measure` may be:

* a single ``torch.Tensor`` -> ``model(x)``
* a ``tuple`` or ``list`` of positional arguments -> ``model(*args)``
* a ``dict`` of keyword arguments -> ``model(**kwargs)``

Anything else is passed as the single positional argument. To pass one list or
tuple *as a single argument*, wrap it: ``(my_list,)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["call_model", "count_params", "count_flops"]

logger = logging.getLogger(__name__)


def call_model(model: nn.Module | Any, example_inputs: Any) -> Any:
    """Call ``model`` with ``example_inputs`` in any of the supported forms.

    A tensor is passed as the only positional argument, a tuple/list is unpacked
    as positional arguments, a dict is unpacked as keyword arguments; any other
    object is passed as the only positional argument.

    Returns:
        Whatever ``model(...)`` returns.
    """
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(example_inputs)


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
        from prunekit.runtime import call

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
        with eval_mode(model), torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                run()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    flops = int(counter.get_total_flops())
    logger.debug("count_flops: %d FLOPs for %s", flops, type(model).__name__)
    return flops


# --------------------------------------------------------------------------- #
# Internal helpers shared with latency.py / memory.py / profile.py.
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's flag.

    Restoring per submodule (not just ``model.train(was_training)``) keeps mixed
    states intact, e.g. a training model with frozen BatchNorm layers.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device | None:
    """Return the device of the model's first parameter/buffer, or ``None`` if it has none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def infer_device(model: nn.Module, example_inputs: Any) -> torch.device:
    """The device a forward runs on: the model's, else the first input tensor's, else CPU."""
    dev = model_device(model)
    if dev is None:
        t = first_tensor(example_inputs)
        dev = t.device if t is not None else torch.device("cpu")
    return dev


def to_device(obj: Any, device: torch.device) -> Any:
    """Recursively move tensors in ``obj`` (tensor/tuple/list/dict) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def first_tensor(obj: Any) -> torch.Tensor | None:
    """Return the first tensor found depth-first in ``obj``, or ``None``."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        items: Any = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        return None
    for o in items:
        t = first_tensor(o)
        if t is not None:
            return t
    return None
