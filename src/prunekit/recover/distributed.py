"""torch.distributed helpers: start the process group from torchrun's env vars, ask who we are.

All helpers also work without torch.distributed initialised (single process): rank 0 of 1.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "broadcast_buffers",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "shutdown_distributed",
    "unwrap_model",
]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """Return True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Return this process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Return the number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Return True on the process that writes files and logs: global rank 0.

    Before the group is initialised the launcher's ``RANK`` env var decides, so a rank-1
    process never writes even if it logs before ``init_distributed``.
    """
    if is_distributed():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Initialise torch.distributed from torchrun's env vars and return ``(rank, world_size, local_rank)``.

    Uses NCCL when CUDA is available (and selects ``cuda:LOCAL_RANK``), else gloo. With no
    ``WORLD_SIZE`` or ``WORLD_SIZE=1`` nothing is initialised and ``(0, 1, 0)`` is returned;
    an already-initialised group is reused.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if is_distributed():
        return dist.get_rank(), dist.get_world_size(), local_rank
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    logger.info("initialised %s process group: rank %d of %d (local rank %d)", backend, rank, world_size, local_rank)
    return rank, world_size, local_rank


def barrier() -> None:
    """Wait for all ranks (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def shutdown_distributed(synchronise: bool = True) -> None:
    """Destroy the process group (no-op when not distributed). With ``synchronise``, all
    ranks first meet at a barrier: a rank that tears gloo down while another is still in a
    collective can abort the process at exit ("terminate called without an active
    exception"). Pass False on an error path, where the other ranks may never arrive."""
    if not is_distributed():
        return
    if synchronise:
        barrier()
    dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place and return it (unchanged when not distributed).

    NCCL only reduces CUDA tensors and gloo handles CPU ones, so the tensor is moved to
    the backend's device for the reduction and back.
    """
    if not is_distributed():
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    t.copy_(buf.to(t.device))
    return t


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace the gradient of each of ``params`` by its mean over all ranks, in place (no-op
    when not distributed; parameters without a gradient are skipped, so every rank must have
    gradients for the same ones). For parameters updated outside DistributedDataParallel's
    backward pass (a second optimizer stepping on its own loss, as bi-level searches do)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            all_reduce_sum(p.grad)
            p.grad.div_(world)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of ``module`` (BatchNorm running statistics, gate temperatures)
    with rank ``src``'s values, in place (no-op when not distributed).

    DistributedDataParallel broadcasts rank 0's buffers at the start of each forward pass, so
    after the last step each rank holds its own update of them (its shard's batch
    statistics); this makes the ranks' models identical again. Moved to the backend's device
    for the broadcast and back, as :func:`all_reduce_sum` does.
    """
    if not is_distributed():
        return
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    with torch.no_grad():
        for buf in module.buffers():
            tmp = buf.to(dev)
            dist.broadcast(tmp, src=src)
            buf.copy_(tmp.to(buf.device))


def all_gather_objects(obj: Any) -> list[Any]:
    """Return ``[obj from rank 0, obj from rank 1, ...]`` (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the wrapped module of a DistributedDataParallel/DataParallel wrapper, else ``model``."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
