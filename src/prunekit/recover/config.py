"""Training configuration and result records, plus the optimizer and LR-schedule builders."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["TrainConfig", "TrainResult", "build_optimizer", "build_scheduler", "lr_factor"]

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("cosine", "step", "constant")
# Fields that only change what is shown or written, not the training trajectory; a resume
# with different values of these is not worth a warning.
_COSMETIC = {"log_every", "tensorboard"}


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (baseline training, fine-tuning, training-time methods).

    The LR schedule is stepped once per optimizer step: linear warm-up over ``warmup_epochs``
    (fractions allowed), then ``cosine`` decay to 0 at the end of ``epochs``, ``step`` decay
    by ``gamma`` at each epoch in ``milestones`` (default: 50% and 75% of ``epochs``), or
    ``constant``. ``amp`` (bf16, or fp16 with loss scaling where bf16 is unsupported) and
    ``channels_last`` only take effect on CUDA. ``kd_alpha``/``kd_temperature`` weight the
    distillation term when a teacher is passed to :func:`prunekit.recover.train`.
    ``batch_size`` is recorded for the code that builds loaders; ``train`` uses the loader it
    is given. ``no_decay_norm_bias`` exempts biases and 1-D (norm) parameters from weight decay.
    ``model_loss``: the model computes its own loss, as torchvision's detectors do in training
    mode: it is called as ``model(inputs, targets)`` and returns a dict of losses, whose sum is
    minimised (no accuracy, teacher or validation top-1 then; inputs and targets may be lists
    of tensors and dicts).
    """

    epochs: int = 10
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_norm_bias: bool = False
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    batch_size: int = 128
    seed: int = 0
    amp: bool = False
    channels_last: bool = False
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    log_every: int = 50
    max_steps_per_epoch: int | None = None
    grad_clip: float | None = None
    find_unused_parameters: bool = False
    sync_bn: bool = False
    deterministic: bool = False
    tensorboard: bool = True
    model_loss: bool = False

    def __post_init__(self) -> None:
        """Validate option values early, with the option's name in the message."""
        self.optimizer = self.optimizer.lower()
        self.schedule = self.schedule.lower()
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 0 or self.lr < 0 or self.warmup_epochs < 0 or self.batch_size < 1:
            raise ValueError("TrainConfig: epochs, lr and warmup_epochs must be >= 0 and batch_size >= 1")
        if not 0.0 <= self.kd_alpha <= 1.0 or self.kd_temperature <= 0:
            raise ValueError("TrainConfig: kd_alpha must be in [0, 1] and kd_temperature > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("TrainConfig.label_smoothing must be in [0, 1)")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError("TrainConfig.max_steps_per_epoch must be >= 1 or None")
        if self.log_every < 1:
            raise ValueError("TrainConfig.log_every must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-friendly dict (tuples become lists)."""
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def trajectory_diff(self, other: dict[str, Any]) -> list[str]:
        """Return names of fields whose values differ from ``other`` (a ``to_dict()``) and affect training."""
        mine = self.to_dict()
        return sorted(k for k in mine if k not in _COSMETIC and k in other and other[k] != mine[k])


@dataclass
class TrainResult:
    """What :func:`prunekit.recover.train` returns.

    ``final`` is the last epoch's record (train/val metrics, lr, seconds, images/s) and
    ``history`` all records, including epochs run before a resume. ``wall_time_s`` and
    ``images_per_s`` (training images over training time, summed over ranks) cover this call only.
    """

    final: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    images_per_s: float = 0.0
    epochs_completed: int = 0
    global_step: int = 0
    resumed_from_epoch: int | None = None


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Return the SGD or AdamW optimizer described by ``cfg`` over the model's trainable parameters.

    The optimizer's defaults (lr, weight decay, momentum) are the config's, so a param group
    that a training callback adds later without those keys gets the config's values.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.no_decay_norm_bias:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups: list[dict[str, Any]] = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Return the LR multiplier after ``step`` optimizer steps (the schedule as a pure function)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        milestones = cfg.milestones or (int(cfg.epochs * 0.5), int(cfg.epochs * 0.75))
        epoch = step // max(steps_per_epoch, 1)
        return cfg.gamma ** sum(epoch >= m for m in milestones)
    total = cfg.epochs * steps_per_epoch
    t = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a per-optimizer-step LambdaLR implementing :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))
