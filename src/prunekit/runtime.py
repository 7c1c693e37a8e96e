"""Runtime helpers shared by the tracer, measurement and surgery: calling a model on
example inputs and switching its train/eval flags."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from torch import nn

from prunekit._perf import unique_modules

if TYPE_CHECKING:
    from prunekit.graph.meta import MetaStandIns


def call(model: nn.Module, example_inputs: Any, swapped: MetaStandIns | None = None) -> Any:
    """Call ``model`` on ``example_inputs`` (a tensor, a tuple of args or a dict of kwargs);
    with ``swapped`` (from :func:`prunekit.graph.meta.meta_tensors`) on the meta device instead, in which case
    the inputs must already be meta tensors (:func:`prunekit.graph.meta.to_meta`). The stand-ins are put in the
    modules' parameter/buffer dicts for the call (what ``torch.func.functional_call`` does,
    without its per-name module lookups) and the originals always restored."""
    if swapped is None:
        return _call(model, example_inputs)
    old = [(store, key, store[key]) for store, key, _ in swapped.slots]
    try:
        for store, key, stand in swapped.slots:
            store[key] = stand
        return _call(model, example_inputs)
    finally:
        for store, key, orig in old:
            store[key] = orig


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str) -> Any:
    """Put ``model`` in 'eval' or 'train' mode, restoring every module's flag afterwards.

    Training mode keeps BatchNorm frozen (running statistics are never touched and batch-1
    inputs work) and keeps the stochastic regularisers (dropout, stochastic depth, drop
    path, drop block) in eval mode: they only scale values by a random mask of the input's
    own shape, so the channel flow is the same, and the training pass then differs from the
    eval pass only where the model's own code branches on ``self.training``.
    """
    modules = unique_modules(model)
    flags = [m.training for m in modules]
    train = mode == "train"
    try:
        if any(type(m).train is not nn.Module.train for m in modules):
            model.train(train)  # some module customises train(): let it
        else:
            for m in modules:  # the same flags without ~1 ms of recursive calls on big models
                m.__dict__["training"] = train
        if train:
            for m in modules:
                if isinstance(m, _FROZEN_IN_TRAINING) or type(m).__name__ in _MASK_REGULARISERS:
                    m.__dict__["training"] = False
        yield model
    finally:
        for m, flag in zip(modules, flags):
            m.__dict__["training"] = flag


_FROZEN_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
_MASK_REGULARISERS = frozenset({"StochasticDepth", "DropPath", "DropBlock2d", "DropBlock", "DropBlockFast2d"})
