"""Recovering accuracy after pruning: the training loop and its callbacks, evaluation, distillation and DDP helpers."""

from __future__ import annotations

from prunekit.recover.bn import recalibrate_bn
from prunekit.recover.callbacks import Callback
from prunekit.recover.checkpoint import atomic_torch_save, load_checkpoint
from prunekit.recover.config import TrainConfig, TrainResult, build_optimizer, build_scheduler, lr_factor
from prunekit.recover.distributed import (
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    shutdown_distributed,
    unwrap_model,
)
from prunekit.recover.evaluate import evaluate
from prunekit.recover.losses import distillation_loss, kd_kl
from prunekit.recover.train import CHECKPOINT_NAME, LOG_NAME, train

__all__ = [
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "Callback",
    "TrainConfig",
    "TrainResult",
    "atomic_torch_save",
    "build_optimizer",
    "build_scheduler",
    "distillation_loss",
    "evaluate",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "shutdown_distributed",
    "is_main_process",
    "kd_kl",
    "load_checkpoint",
    "recalibrate_bn",
    "lr_factor",
    "train",
    "unwrap_model",
]
