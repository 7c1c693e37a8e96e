"""The ``Callback`` protocol of :func:`prunekit.recover.train`: the one way to extend the loop.

A callback is an object whose methods the loop calls at fixed points: once before training
(where it may add parameters to the optimizer), before every batch's forward pass, for an
extra loss term after the forward, between the backward pass and the optimizer step (to edit
gradients), after every optimizer step, after every epoch, and once at the end. Its ``state_dict`` goes into the run's checkpoint, so a resumed run restores
schedules that callbacks keep (temperatures, penalty weights) exactly. :class:`Callback` has
no-op defaults; subclass it and override only what you need.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Callback"]


class Callback:
    """Base class of training-loop callbacks; every method is a no-op by default.

    Call order in :func:`prunekit.recover.train`, for each callback in the order given:
    ``on_train_start`` (after the optimizer is built, before the LR scheduler is built and
    before a checkpoint is restored), then on resume ``load_state_dict``; per batch
    ``on_batch_start`` -> forward -> ``extra_loss`` -> backward -> ``on_before_step`` -> gradient
    clipping -> optimizer step -> ``on_step``; per epoch
    ``on_epoch_end`` (before the checkpoint is written); ``on_train_end`` once after the last
    epoch (not when training raises). ``model`` is always the unwrapped module (never the
    DistributedDataParallel wrapper).
    """

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Prepare training; called once, also when resuming.

        May change the model and may call ``optimizer.add_param_group`` for parameters that are
        not the model's (e.g. gates kept outside it). Options a new group does not set take the
        optimizer's defaults (the config's lr, weight decay, momentum). Because the scheduler is
        built afterwards, added groups follow the LR schedule, and a resumed optimizer state
        covers them. Parameters outside the model are not in the model's state dict: keep
        their values in :meth:`state_dict` so that a resume restores them, and under DDP they
        are not averaged across ranks. Returns nothing.
        """

    def on_batch_start(self, model: nn.Module, step: int) -> None:
        """Called right before the forward pass of every training batch; returns nothing.

        ``step`` is the 1-based global number of the optimizer step this batch makes (the
        value :meth:`on_step` then receives). The loop puts the model in train mode at the
        start of every epoch; a callback that needs another mode (e.g. ``model.eval()`` to keep
        BatchNorm statistics frozen) sets it here.
        """

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """Return a scalar term added to this step's loss, or None for none.

        Called after the batch's forward pass (so it may use activations recorded by forward
        hooks) and inside the autocast region; ``batch`` is the ``(inputs, targets)`` pair on
        the training device. The epoch's mean of the sum of all callbacks' terms is reported
        as ``train_extra_loss`` (when some callback returned a term).
        """
        return None

    def on_before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called after the backward pass and before gradient clipping and the optimizer step;
        returns nothing.

        The place to change ``.grad`` in place with terms that have no loss to differentiate
        (e.g. a nuclear-norm sub-gradient): what is there when this returns is what the
        optimizer uses. Gradients are unscaled (under fp16 mixed precision the loop unscales
        them first when some callback overrides this method) and, under DDP, already averaged
        across ranks. ``step`` is the 1-based number of the step about to be taken (the value
        :meth:`on_step` then receives).
        """

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step with the 1-based global step count; returns nothing.

        The place to advance schedules (temperature, penalty weight) or apply masks.
        """

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        """Called after each epoch's record is built, before the checkpoint is written.

        ``epoch`` is 1-based (equal to ``record["epoch"]``). Keys added to ``record`` (plain
        JSON values) land in the history and ``train_log.jsonl``. Returns nothing.
        """

    def on_train_end(self, model: nn.Module) -> None:
        """Called once after the last epoch (also when a resumed run had nothing left to do); returns nothing."""

    def state_dict(self) -> dict[str, Any]:
        """Return the callback's resumable state (tensors and plain Python values only: the
        checkpoint is loaded with ``weights_only=True``); empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict` (called on resume, after
        :meth:`on_train_start` and after the optimizer state is loaded); returns nothing."""
