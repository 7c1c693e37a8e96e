"""Latency in ONNX Runtime (CPU execution provider), of a whole model or of one layer.

The module is exported with prunekit's exporter (TorchScript, falling back to dynamo) at the
exact shapes of the inputs (no dynamic axes, so ONNX Runtime can specialise its kernels), then
run in an ``InferenceSession`` with ``intra_op_num_threads`` fixed and one inter-op thread.
Needs the optional packages onnx and onnxruntime (the ``export`` or ``bench`` extra).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.measure.latency import LatencyStats
from prunekit.measure.latency_table import timed_blocks
from prunekit.runtime import first_tensor, model_mode

__all__ = ["onnxruntime_available", "onnx_bytes", "ort_session", "onnx_session", "time_session",
           "measure_onnx_latency"]


def onnxruntime_available() -> bool:
    """Whether onnx and onnxruntime can be imported (checked without importing them)."""
    return all(importlib.util.find_spec(n) is not None for n in ("onnx", "onnxruntime"))


def _inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("onnx latency: example_inputs must be a tensor or a tuple of tensors")
    return tuple(t.detach().cpu() for t in inputs)


def onnx_bytes(module: nn.Module, example_inputs: Any) -> bytes:
    """``module`` (in eval mode, on CPU; the module is not moved) exported to ONNX at the exact
    shapes of ``example_inputs``, as bytes. Raises ImportError with the install hint when onnx
    is missing."""
    from prunekit.export import _export, _require

    _require("onnx")
    inputs = _inputs(example_inputs)
    if any(t.device.type != "cpu" for t in module.state_dict().values()):
        module = copy.deepcopy(module).cpu()  # never move the caller's module
    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        with model_mode(module, "eval"), torch.no_grad():
            _export(module, inputs, path, 17, dynamic_batch=False)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def ort_session(model_bytes: bytes, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session of an exported model with ``threads`` intra-op threads, one
    inter-op thread and every graph optimisation."""
    from prunekit.export import _require

    ort = _require("onnxruntime")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def onnx_session(module: nn.Module, example_inputs: Any, threads: int = 1) -> tuple[Any, dict[str, np.ndarray]]:
    """An ONNX Runtime session running ``module`` (:func:`onnx_bytes`, :func:`ort_session`) and
    the feeds of ``example_inputs``."""
    session = ort_session(onnx_bytes(module, example_inputs), threads)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), _inputs(example_inputs))}
    return session, feeds


def time_session(session: Any, feeds: dict[str, np.ndarray], *, threads: int, batch_size: int,
                 min_run_time: float = 0.5, warmup: int = 3, blocks: int = 7) -> LatencyStats:
    """Time ``session.run`` on ``feeds``: ``warmup`` untimed runs, then ``blocks`` timed blocks
    of about ``min_run_time / blocks`` seconds. Returns a
    :class:`~prunekit.measure.latency.LatencyStats` (``device="onnxruntime-cpu"``, median/IQR/mean
    over the blocks' per-run times; ``threads`` and ``batch_size`` as given)."""
    if min_run_time <= 0:
        raise ValueError(f"min_run_time must be > 0, got {min_run_time}")
    for _ in range(warmup):
        session.run(None, feeds)
    seconds, per_block = timed_blocks(lambda: session.run(None, feeds), lambda: None, min_run_time, blocks)
    times = np.asarray(seconds)
    q1, q3 = np.percentile(times, [25, 75])
    return LatencyStats(median_ms=float(np.median(times)) * 1e3, iqr_ms=float(q3 - q1) * 1e3,
                        mean_ms=float(times.mean()) * 1e3, runs=blocks * per_block, threads=threads,
                        device="onnxruntime-cpu", batch_size=batch_size)


def measure_onnx_latency(model: nn.Module, example_inputs: Any, *, threads: int = 1, min_run_time: float = 0.5,
                         warmup: int = 3, blocks: int = 7) -> LatencyStats:
    """Export ``model`` and time it in ONNX Runtime on CPU with ``threads`` intra-op threads
    (:func:`onnx_session`, :func:`time_session`); returns the
    :class:`~prunekit.measure.latency.LatencyStats`."""
    session, feeds = onnx_session(model, example_inputs, threads)
    t0 = first_tensor(example_inputs)
    return time_session(session, feeds, threads=threads, min_run_time=min_run_time, warmup=warmup, blocks=blocks,
                        batch_size=int(t0.shape[0]) if t0 is not None and t0.dim() else 1)
