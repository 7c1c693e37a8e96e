"""Classification evaluation: mean cross-entropy, top-k accuracy and throughput."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from prunekit.recover.distributed import all_reduce_sum, is_distributed
from prunekit.runtime import infer_device, model_mode

__all__ = ["evaluate"]


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked (and supported), otherwise a no-op context."""
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    topk: Sequence[int] = (1, 5),
    amp: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Evaluate a classifier and return ``{"loss", "top1", "top5", "images", "images_per_s"}``.

    ``loss`` is the mean cross-entropy; accuracies are fractions in [0, 1]. There is one
    ``top{k}`` key per entry of ``topk``; k is capped at the number of classes (so "top5"
    of a 3-class model is top-3, i.e. 1.0). When the loader uses a ``DistributedSampler``
    the sums are all-reduced so every rank returns the global result (the sampler may pad
    with a few repeated images to even out the shards). Every submodule's train/eval
    flag is restored afterwards.
    """
    device = torch.device(device) if device is not None else infer_device(model)
    ks = sorted({int(k) for k in topk})
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(len(ks), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    start = time.perf_counter()
    with model_mode(model, "eval"):
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last and device.type == "cuda" and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            maxk = min(ks[-1], logits.shape[1])
            hits = logits.topk(maxk, dim=1).indices.eq(y[:, None])
            for i, k in enumerate(ks):
                correct[i] += hits[:, : min(k, maxk)].any(dim=1).sum()
            count += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    sampler = getattr(loader, "sampler", None) if isinstance(loader, DataLoader) else None
    if is_distributed() and isinstance(sampler, DistributedSampler):
        stats = all_reduce_sum(torch.cat([loss_sum[None], count[None], correct]))
        loss_sum, count, correct = stats[0], stats[1], stats[2:]
    n = float(count.item())
    if n == 0:
        raise ValueError("evaluate: the loader yielded no examples")
    out = {"loss": float(loss_sum.item()) / n}
    out.update({f"top{k}": float(c) / n for k, c in zip(ks, correct.tolist())})
    out["images"] = n
    out["images_per_s"] = n / max(elapsed, 1e-9)
    return out
