"""Wall-clock inference latency with ``torch.utils.benchmark``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import timeit
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from prunekit.runtime import call_model, first_tensor, infer_device, model_device, model_mode, to_device

__all__ = ["LatencyStats", "measure_latency"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Latency statistics of one model call.

    Attributes:
        median_ms: Median time per call, milliseconds.
        iqr_ms: Interquartile range of the per-call time across timed blocks, ms.
        mean_ms: Mean time per call, milliseconds.
        runs: Total number of timed calls (blocks x calls per block).
        threads: Number of intra-op CPU threads used while timing.
        device: Device the model ran on, e.g. ``"cpu"`` or ``"cuda:0"``.
        batch_size: Dim 0 of the first input tensor (1 if it is a scalar or absent).
        peak_memory_bytes: Peak CUDA memory allocated while timing; ``None`` off CUDA.
    """

    median_ms: float
    iqr_ms: float
    mean_ms: float
    runs: int
    threads: int
    device: str
    batch_size: int
    peak_memory_bytes: int | None = None

    @property
    def throughput(self) -> float:
        """Samples (images) per second: ``batch_size / median seconds`` (inf if median is 0)."""
        if self.median_ms <= 0:
            return math.inf
        return self.batch_size / (self.median_ms / 1000.0)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the fields plus ``throughput``."""
        d = dataclasses.asdict(self)
        d["throughput"] = self.throughput
        return d


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops cpp_extension's "No CUDA runtime is found" record: importing torch.utils.benchmark
    logs it on every CPU-only machine that has a CUDA toolkit, and timing never builds an extension."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _import_benchmark() -> Any:
    """``torch.utils.benchmark``, imported lazily (it pulls in the slow cpp_extension) with only
    that module's "No CUDA runtime is found" notice silenced, during the import only."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    notice = _NoCudaRuntimeNotice()
    cpp_logger.addFilter(notice)
    try:
        import torch.utils.benchmark as benchmark
    finally:
        cpp_logger.removeFilter(notice)
    return benchmark


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (warm-up must match timing)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _cuda_timer(device: torch.device) -> Callable[[], float]:
    """A timer that synchronises ``device`` first, so queued kernels are included."""

    def timer() -> float:
        torch.cuda.synchronize(device)
        return timeit.default_timer()

    return timer


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same; a missing index matches the current one."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type != "cuda":
            return True
        cur = torch.cuda.current_device()
        return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)
    return a.index == b.index


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    threads: int | None = None,
    warmup: int = 3,
    min_run_time: float = 0.5,
    device: str | torch.device | None = None,
) -> LatencyStats:
    """Time inference calls of ``model`` with ``torch.utils.benchmark.Timer``.

    The model is put in eval mode under ``torch.no_grad()`` (every submodule's
    train/eval flag is restored afterwards), called ``warmup`` times untimed, then
    timed with ``Timer.blocked_autorange(min_run_time=...)`` at a fixed thread
    count. On CUDA the timer synchronises the device around each block and the
    peak allocated memory during timing is recorded.

    Args:
        model: Module to time. It is not moved.
        example_inputs: Tensor, tuple/list of positional args or dict of kwargs.
        threads: Intra-op CPU threads; ``None`` uses ``torch.get_num_threads()``.
        warmup: Untimed calls before timing (caches, allocator, lazy init).
        min_run_time: Minimum total seconds of timed execution.
        device: Device to run on; inputs are moved there. ``None`` means the
            model's device (for a parameter-free model, the first input
            tensor's, else CPU). A model with parameters must already be on it.

    Returns:
        A :class:`LatencyStats`.

    Raises:
        ValueError: On invalid arguments or when the model is not on ``device``.
    """
    if threads is None:
        threads = torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if min_run_time <= 0:
        raise ValueError(f"min_run_time must be > 0, got {min_run_time}")

    mdev = model_device(model)
    if device is None:
        dev = infer_device(model, example_inputs)
    else:
        dev = torch.device(device)
        if mdev is not None and not _same_device(mdev, dev):
            # Moving the model silently would mutate the caller's object; ask instead.
            raise ValueError(
                f"model is on {mdev} but device={dev} was requested; move it first"
            )
        if mdev is not None:
            dev = mdev  # same device; prefer the concrete index, e.g. cuda:0
        elif dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())

    inputs = to_device(example_inputs, dev)
    t0 = first_tensor(inputs)
    batch_size = int(t0.shape[0]) if t0 is not None and t0.dim() > 0 else 1
    is_cuda = dev.type == "cuda"

    benchmark = _import_benchmark()

    timer_kwargs: dict[str, Any] = {}
    if is_cuda:
        timer_kwargs["timer"] = _cuda_timer(dev)
    timer = benchmark.Timer(
        stmt="call_model(model, inputs)",
        globals={"call_model": call_model, "model": model, "inputs": inputs},
        num_threads=threads,
        **timer_kwargs,
    )

    peak: int | None = None
    # Grad mode is thread-local and Timer runs the statement in this thread, so
    # the surrounding no_grad applies to the timed calls too.
    with model_mode(model, "eval"), torch.no_grad():
        with _torch_threads(threads):
            for _ in range(warmup):
                call_model(model, inputs)
        if is_cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        m = timer.blocked_autorange(min_run_time=min_run_time)
        if is_cuda:
            torch.cuda.synchronize(dev)
            peak = int(torch.cuda.max_memory_allocated(dev))

    stats = LatencyStats(
        median_ms=m.median * 1e3,
        iqr_ms=m.iqr * 1e3,
        mean_ms=m.mean * 1e3,
        runs=len(m.times) * int(m.number_per_run),
        threads=threads,
        device=str(dev),
        batch_size=batch_size,
        peak_memory_bytes=peak,
    )
    logger.debug("measure_latency: %s", stats)
    return stats
