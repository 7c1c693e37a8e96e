"""The one training loop: baseline training, fine-tuning after pruning, training-time methods.

``train`` runs epochs of SGD/AdamW with an optional distillation teacher, resumable atomic
checkpoints and JSON-lines logs, on one device or under ``torchrun`` with
DistributedDataParallel. Everything a method adds to the loop (extra parameters, soft masks,
regularisers, schedules) goes through :class:`~prunekit.recover.callbacks.Callback`; the older
``hooks`` and ``loss_fn_extra`` arguments are adapters onto it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prunekit.persist import atomic_write
from prunekit.recover.callbacks import Callback
from prunekit.recover.checkpoint import atomic_torch_save, capture_rng_state, load_checkpoint, restore_rng_state
from prunekit.recover.config import TrainConfig, TrainResult, build_optimizer, build_scheduler
from prunekit.recover.distributed import (
    all_gather_objects,
    all_reduce_sum,
    broadcast_buffers,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    unwrap_model,
)
from prunekit.recover.evaluate import evaluate
from prunekit.recover.losses import distillation_loss
from prunekit.runtime import infer_device as model_device  # the model's device, CPU for one without tensors
from prunekit.runtime import to_device

__all__ = ["CHECKPOINT_NAME", "LOG_NAME", "TrainConfig", "TrainResult", "evaluate", "steps_per_epoch", "train"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
_POSTFIX_EVERY_S = 0.5
"""Seconds between two updates of the progress bar's loss (each reads the loss off the device)."""
LOG_NAME = "train_log.jsonl"

Hook = Callable[[nn.Module, int], Any]


def _seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def steps_per_epoch(loader: Iterable, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: ``len(loader)`` capped by ``max_steps_per_epoch``."""
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        if cfg.max_steps_per_epoch is None:
            raise ValueError("train_loader has no len(); set TrainConfig.max_steps_per_epoch") from None
        return cfg.max_steps_per_epoch
    return n if cfg.max_steps_per_epoch is None else min(n, cfg.max_steps_per_epoch)


def _amp_setup(device: torch.device, cfg: TrainConfig) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.amp.GradScaler]:
    """Return (autocast context factory, GradScaler); both inert unless amp on CUDA."""
    use_amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not use_amp:
        logger.warning("TrainConfig.amp ignored: mixed precision is only used on CUDA (device is %s)", device)
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    # Loss scaling is only needed for fp16; bf16 has float32's exponent range.
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    if use_amp:
        return (lambda: torch.autocast("cuda", dtype=dtype)), scaler
    return contextlib.nullcontext, scaler


class _HookCallback(Callback):
    """Adapter for ``train(hooks=...)``: calls ``hook(model, step)`` after every optimizer step."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook

    def on_step(self, model: nn.Module, step: int) -> None:
        """Call the hook with the model and the 1-based global step."""
        self.hook(model, step)


class _ExtraLossCallback(Callback):
    """Adapter for ``train(loss_fn_extra=...)``: adds ``fn(model)`` to every step's loss."""

    def __init__(self, fn: Callable[[nn.Module], Tensor]) -> None:
        self.fn = fn

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """Return ``fn(model)`` (the batch is not used)."""
        return self.fn(model)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of every param group, including groups that callbacks added."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _open_tensorboard(run_dir: Path, cfg: TrainConfig) -> Any:
    """Return a SummaryWriter under ``run_dir/tb`` or None when tensorboard is not installed."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(run_dir / "tb"))
    except Exception:  # optional dependency: any import or start-up failure just disables it
        return None


def _train_one_epoch(
    net: nn.Module, model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, cfg: TrainConfig, *,
    device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager], channels_last: bool,
    teacher: nn.Module | None, callbacks: Sequence[Callback], epoch: int, global_step: int, steps: int,
    show_progress: bool,
) -> tuple[dict[str, float], int]:
    """Run one epoch; return (globally reduced train metrics, updated global step)."""
    net.train()
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)  # DistributedSampler reshuffles by seed + epoch
    # loss*n, correct, n, extra*n, steps that had an extra term (so every rank agrees on the key)
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    # Only callbacks that override on_before_step make the loop unscale gradients before the step.
    before_step = [cb for cb in callbacks if type(cb).on_before_step is not Callback.on_before_step]
    batches = loader if cfg.max_steps_per_epoch is None else islice(loader, cfg.max_steps_per_epoch)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not show_progress, dynamic_ncols=True)
    start = shown = time.perf_counter()
    shown -= _POSTFIX_EVERY_S  # the first step shows the loss at once
    try:
        for i, (x, y) in enumerate(batches):
            x, y = to_device(x, device), to_device(y, device)
            if channels_last and isinstance(x, Tensor) and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            for cb in callbacks:
                cb.on_batch_start(model, global_step + 1)
            with autocast():
                if cfg.model_loss:
                    logits, loss = None, _summed_losses(net(x, y))
                else:
                    logits = net(x)
                    teacher_logits = None
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = teacher(x)
                    loss, _, _ = distillation_loss(
                        logits, y, teacher_logits, alpha=cfg.kd_alpha, temperature=cfg.kd_temperature,
                        label_smoothing=cfg.label_smoothing,
                    )
                extra = None
                for cb in callbacks:
                    term = cb.extra_loss(model, (x, y))
                    if term is not None:
                        extra = term if extra is None else extra + term
            objective = loss if extra is None else loss + extra
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            if cfg.grad_clip is not None or before_step:
                # Clipping and gradient-editing callbacks work on true gradients, not scaled ones.
                scaler.unscale_(optimizer)
            for cb in before_step:
                cb.on_before_step(model, optimizer, global_step + 1)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(_optimizer_params(optimizer), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            for cb in callbacks:
                cb.on_step(model, global_step)
            n = len(x) if isinstance(x, (list, tuple)) else x.shape[0]
            with torch.no_grad():
                sums[0] += loss.detach().double() * n
                if logits is not None:
                    sums[1] += (logits.argmax(dim=1) == y).sum()
                sums[2] += n
                if extra is not None:
                    sums[3] += extra.detach().double() * n
                    sums[4] += 1
            if (i + 1) % cfg.log_every == 0:
                # .item() synchronises the device, so only every log_every steps.
                value = float(loss.item())
                if not math.isfinite(value):
                    raise FloatingPointError(f"training loss is {value} at epoch {epoch + 1}, step {global_step}")
                logger.debug("epoch %d step %d loss %.4f", epoch + 1, global_step, value)
            if show_progress and time.perf_counter() - shown >= _POSTFIX_EVERY_S:
                # The running mean loss on the bar; reading it syncs the device, so at most
                # every _POSTFIX_EVERY_S (epochs shorter than log_every steps show it too).
                shown = time.perf_counter()
                bar.set_postfix(loss=f"{float(sums[0].item()) / max(float(sums[2].item()), 1.0):.4f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.3g}")
            bar.update(1)
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    all_reduce_sum(sums)
    count = max(float(sums[2].item()), 1.0)
    stats = {
        "train_loss": float(sums[0].item()) / count,
        "train_acc": float(sums[1].item()) / count,
        "train_images": float(sums[2].item()),
        "seconds": seconds,
        "images_per_s": float(sums[2].item()) / max(seconds, 1e-9),
    }
    if sums[4].item() > 0:
        stats["train_extra_loss"] = float(sums[3].item()) / count
    return stats, global_step


def _summed_losses(out: Any) -> Tensor:
    """The loss of a model that computes its own (``TrainConfig.model_loss``): the sum of
    the dict of losses it returns (or the one loss tensor)."""
    if isinstance(out, dict) and out and all(isinstance(v, Tensor) for v in out.values()):
        return sum(out.values())  # type: ignore[return-value]
    if isinstance(out, Tensor) and out.numel() == 1:
        return out.reshape(())
    raise TypeError(f"TrainConfig.model_loss: the model returned {type(out).__name__}; expected a dict of loss "
                    "tensors (torchvision detection models in training mode) or one scalar loss")


def train(
    model: nn.Module,
    train_loader: Iterable,
    cfg: TrainConfig,
    *,
    val_loader: Iterable | None = None,
    teacher: nn.Module | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    hooks: Sequence[Hook] | None = None,
    loss_fn_extra: Callable[[nn.Module], Tensor] | None = None,
    callbacks: Sequence[Callback] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs and return a :class:`TrainResult`.

    The model trains on the device its parameters are on (moved to ``cuda:LOCAL_RANK`` under
    NCCL). The global Python/numpy/torch RNGs are seeded with ``cfg.seed + rank`` at the start.
    ``train_loader`` yields ``(inputs, class targets)`` tensor pairs (a list of such pairs
    works). With ``teacher`` the loss is ``(1 - kd_alpha) * CE + kd_alpha * T^2 * KL``.

    ``callbacks`` (:class:`~prunekit.recover.callbacks.Callback`) are called in the order
    given: ``on_train_start`` after the optimizer is built and before the LR scheduler is
    built or a checkpoint restored (so param groups they add follow the schedule and get their
    saved optimizer state), ``on_batch_start`` before each forward, ``extra_loss`` after it
    (the terms of all callbacks are added to the loss), ``on_before_step`` after the backward
    pass and before gradient clipping and the optimizer step (gradients unscaled under mixed
    precision), ``on_step`` after each optimizer step,
    ``on_epoch_end`` on each epoch's record and ``on_train_end`` after the last epoch.
    ``hooks`` (called as ``hook(model, global_step)`` after every optimizer step) and
    ``loss_fn_extra`` (``loss_fn_extra(model)`` added to each step's loss) are run as
    callbacks after those in ``callbacks``. ``grad_clip`` clips the gradients of every
    optimizer param group, including added ones.

    With ``run_dir``, after every epoch ``run_dir/checkpoint.pt`` is replaced atomically (model,
    optimizer, scheduler, scaler, RNG states of every rank, loader generator, history, the
    ``state_dict()`` of each of ``callbacks``) and a line is appended to
    ``run_dir/train_log.jsonl``; ``resume=True`` continues from that checkpoint exactly (a
    missing checkpoint starts fresh), handing each callback its saved state; a checkpoint
    with a different number of callback states than ``callbacks`` raises ValueError (``hooks``
    and ``loss_fn_extra`` have no state and may differ). On KeyboardInterrupt the last
    completed epoch's checkpoint is already on disk and the interrupt is re-raised. Under
    torchrun the model is wrapped in DistributedDataParallel (every parameter that requires a
    gradient when training starts, gates included, is averaged across ranks), the buffers
    (BatchNorm statistics) are broadcast from rank 0 after every epoch so all ranks end each
    epoch with the same model, metrics are all-reduced and only rank 0 writes files, logs and progress bars (and saves rank 0's callback states); pass the
    same ``run_dir`` on every rank (the RNG states of all ranks are gathered into rank 0's
    checkpoint, a collective call).
    """
    wall_start = time.perf_counter()
    if cfg.model_loss and (teacher is not None or val_loader is not None):
        raise ValueError("TrainConfig.model_loss: a model that computes its own loss trains without teacher and "
                         "val_loader (evaluate it with its own metric)")
    if not is_distributed() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed()
    rank, world = get_rank(), get_world_size()
    main = rank == 0
    model = unwrap_model(model)
    if is_distributed() and torch.distributed.get_backend() == "nccl" and model_device(model).type != "cuda":
        model.to(torch.device("cuda", torch.cuda.current_device()))
    device = model_device(model)
    channels_last = cfg.channels_last and device.type == "cuda"
    if cfg.channels_last and not channels_last:
        logger.warning("TrainConfig.channels_last ignored: only used on CUDA (device is %s)", device)
    if cfg.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    # Each rank gets its own stream (different augmentation/dropout); the weights are still
    # identical because DDP broadcasts rank 0's parameters when it wraps the model.
    _seed_everything(cfg.seed + rank)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher = unwrap_model(teacher).to(device).eval()
    autocast, scaler = _amp_setup(device, cfg)
    steps = steps_per_epoch(train_loader, cfg)
    optimizer = build_optimizer(model, cfg)
    stateful = list(callbacks or ())
    every = stateful + [_HookCallback(h) for h in hooks or ()]
    if loss_fn_extra is not None:
        every.append(_ExtraLossCallback(loss_fn_extra))
    for cb in every:
        cb.on_train_start(model, optimizer)
    scheduler = build_scheduler(optimizer, cfg, steps)
    generator: torch.Generator | None = getattr(train_loader, "generator", None)

    run_path = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_path / CHECKPOINT_NAME if run_path is not None else None
    start_epoch, global_step, history, resumed_from = 0, 0, [], None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        saved_callbacks = list(ckpt.get("callbacks", []))
        if len(saved_callbacks) != len(stateful):
            raise ValueError(f"checkpoint {ckpt_path} holds the states of {len(saved_callbacks)} callbacks but "
                             f"{len(stateful)} callbacks were passed; pass the callbacks of the run being resumed")
        changed = cfg.trajectory_diff(ckpt.get("config", {}))
        if changed and main:
            logger.warning("resuming with changed TrainConfig fields %s: the run will not match an uninterrupted one", changed)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        for cb, state in zip(stateful, saved_callbacks):
            cb.load_state_dict(state)
        start_epoch = resumed_from = int(ckpt["epoch"])
        global_step, history = int(ckpt["global_step"]), list(ckpt["history"])
        rng_states = ckpt["rng"]
        if len(rng_states) != world and main:
            logger.warning("checkpoint was written by %d ranks, now %d: RNG streams differ from the original run", len(rng_states), world)
        restore_rng_state(rng_states[rank if rank < len(rng_states) else 0])
        if generator is not None and ckpt.get("loader_generator") is not None:
            generator.set_state(ckpt["loader_generator"])
        if main:
            logger.info("resumed from %s at epoch %d (step %d)", ckpt_path, start_epoch, global_step)
    elif resume and main:
        logger.info("resume=True but no checkpoint at %s; starting from scratch", ckpt_path)
    elif ckpt_path is not None and ckpt_path.is_file() and main:
        logger.warning("overwriting the checkpoint in %s (pass resume=True to continue it)", run_path)

    writer = None
    if run_path is not None and main:
        run_path.mkdir(parents=True, exist_ok=True)
        # Rewrite the log from the checkpoint's history so the two always agree, even if the
        # previous run died between writing the checkpoint and appending the log line.
        atomic_write(run_path / LOG_NAME, "".join(json.dumps(r) + "\n" for r in history))
        writer = _open_tensorboard(run_path, cfg)

    net: nn.Module = model
    if world > 1:
        if cfg.sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )

    train_seconds, train_images = 0.0, 0.0
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            lr = float(optimizer.param_groups[0]["lr"])
            stats, global_step = _train_one_epoch(
                net, model, train_loader, optimizer, scheduler, scaler, cfg, device=device, autocast=autocast,
                channels_last=channels_last, teacher=teacher, callbacks=every, epoch=epoch, global_step=global_step,
                steps=steps, show_progress=progress and main,
            )
            if world > 1:
                # The last forward passes left each rank its own running statistics (DDP
                # broadcasts buffers only before a forward): make the epoch's model the same on
                # every rank, for evaluation, callbacks, the checkpoint and the returned model.
                broadcast_buffers(model)
            train_seconds += stats["seconds"]
            train_images += stats["train_images"]
            record: dict[str, Any] = {"epoch": epoch + 1, "step": global_step, "lr": lr, **stats}
            if val_loader is not None:
                val = evaluate(model, val_loader, device=device, amp=cfg.amp, channels_last=channels_last)
                record.update({f"val_{k}": v for k, v in val.items() if k not in ("images", "images_per_s")})
            for cb in every:
                cb.on_epoch_end(model, epoch + 1, record)
            history.append(record)
            if ckpt_path is not None:
                rng_states = all_gather_objects(capture_rng_state())  # collective: every rank calls it
                if main:
                    atomic_torch_save({
                        "format": "prunekit.train/1", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                        "global_step": global_step, "rng": rng_states,
                        "loader_generator": generator.get_state() if generator is not None else None,
                        "history": history, "config": cfg.to_dict(), "world_size": world,
                        "callbacks": [cb.state_dict() for cb in stateful],
                    }, ckpt_path)
                    with open(run_path / LOG_NAME, "a") as f:  # type: ignore[operator]
                        f.write(json.dumps(record) + "\n")
            if writer is not None:
                for key, value in record.items():
                    # Callbacks may add non-numeric keys to the record; tensorboard takes scalars only.
                    if key not in ("epoch", "step") and isinstance(value, (int, float)):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            if main:
                val_msg = f" val loss {record['val_loss']:.4f} top1 {record['val_top1']:.4f}" if val_loader is not None else ""
                logger.info("epoch %d/%d lr %.4g train loss %.4f acc %.4f%s (%.1fs, %.0f img/s)", epoch + 1, cfg.epochs, lr,
                            stats["train_loss"], stats["train_acc"], val_msg, stats["seconds"], stats["images_per_s"])
    except KeyboardInterrupt:
        if main:
            done = len(history)
            where = f"; the checkpoint of epoch {done} is {ckpt_path}" if ckpt_path is not None and done else ""
            logger.warning("interrupted during epoch %d%s", epoch + 1, where)
        raise
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
    for cb in every:
        cb.on_train_end(model)
    return TrainResult(
        final=dict(history[-1]) if history else {},
        history=history,
        wall_time_s=time.perf_counter() - wall_start,
        images_per_s=train_images / train_seconds if train_seconds > 0 else 0.0,
        epochs_completed=len(history),
        global_step=global_step,
        resumed_from_epoch=resumed_from,
    )
