"""A per-layer latency table measured on the current device, to plan for a latency budget.

Every conv/linear layer is timed alone, on its real input shape, at a grid of input/output
width fractions; a pruned model's latency is then estimated by interpolating each layer in
the table and scaling the measured latency of the whole original model by the same factor
(so the ops around the layers, which shrink with them, are counted too). Layers with
identical configuration and input shape are timed once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from prunekit.handlers import handler_for
from prunekit.measure.latency import _torch_threads, measure_latency
from prunekit.runtime import call_model, infer_device, model_mode

__all__ = ["LatencyTable", "build_latency_table"]

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class LayerTiming:
    """Timings of one layer: ``grid_ms[i, j]`` at input fraction ``fractions[i]`` and output
    fraction ``fractions[j]`` of its original ``in_channels``/``out_channels``."""

    in_channels: int
    out_channels: int
    grid_ms: np.ndarray


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Per-layer timings plus the measured latency of the whole original model."""

    layers: dict[str, LayerTiming]
    fractions: tuple[float, ...]
    model_ms: float
    device: str

    def layer_ms(self, name: str, in_channels: int, out_channels: int) -> float:
        """Interpolated latency (ms) of layer ``name`` with the given widths."""
        t = self.layers[name]
        fi, fo = in_channels / t.in_channels, out_channels / t.out_channels
        f = np.asarray(self.fractions)
        rows = np.array([np.interp(fo, f, t.grid_ms[i]) for i in range(len(f))])
        return float(np.interp(fi, f, rows))

    def estimate(self, model: nn.Module) -> float:
        """Estimated latency (ms) of ``model``, a pruned copy of the tabled model."""
        full = sum(t.grid_ms[-1, -1] for t in self.layers.values())
        now = 0.0
        mods = dict(model.named_modules())
        for name, t in self.layers.items():
            m = mods.get(name)
            if m is None:
                continue
            cin, cout = _widths(m)
            now += self.layer_ms(name, cin, cout)
        return self.model_ms * now / full if full > 0 else self.model_ms


def _widths(m: nn.Module) -> tuple[int, int]:
    """``(input, output)`` widths of a tabled layer, from its handler."""
    handler = handler_for(m)
    widths = handler.widths(m) if handler is not None else None
    assert widths is not None  # only layers with widths are tabled
    return widths


def _timed(m: nn.Module) -> bool:
    """Layers the table times alone: those whose handler can rebuild them at other widths
    (linear, and conv except transposed). The check builds its copy on the meta device, so
    it allocates nothing."""
    handler = handler_for(m)
    if handler is None or handler.widths(m) is None:
        return False
    with torch.device("meta"):
        return handler.resized(m, 1.0, 1.0) is not None


def _scaled(m: nn.Module, fi: float, fo: float) -> tuple[nn.Module, int]:
    """A fresh layer like ``m`` with widths scaled by ``fi``/``fo`` (by its handler); returns
    it and its input width."""
    handler = handler_for(m)
    layer = handler.resized(m, fi, fo) if handler is not None else None
    assert layer is not None  # _timed(m) holds
    return layer, _widths(layer)[0]


def _time(layer: nn.Module, shape: tuple[int, ...], channel_dim: int, cin: int, device: torch.device,
          min_run_time: float) -> float:
    shape = list(shape)
    shape[channel_dim] = cin
    x = torch.randn(shape, device=device)
    layer = layer.to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        return time_calls(lambda: layer(x), sync, min_run_time)


def timed_blocks(call: Callable[[], Any], sync: Callable[[], Any], min_run_time: float, blocks: int = 5
                 ) -> tuple[list[float], int]:
    """Seconds per ``call()`` in each of ``blocks`` timed blocks of about ``min_run_time /
    blocks`` seconds (after one untimed call and one timed to size the blocks), and the calls
    per block; ``sync()`` waits for queued work (a CUDA synchronise) before each clock read."""
    call()
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    number = max(1, int(min_run_time / blocks / once))
    out = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(number):
            call()
        sync()
        out.append((time.perf_counter() - t0) / number)
    return out, number


def time_calls(call: Callable[[], Any], sync: Callable[[], Any], min_run_time: float) -> float:
    """Median milliseconds of one ``call()`` over five blocks (:func:`timed_blocks`)."""
    return float(np.median(timed_blocks(call, sync, min_run_time)[0])) * 1e3


def layer_inputs(model: nn.Module, example_inputs: Any) -> dict[str, tuple[int, ...]]:
    """The input shape of every layer a latency table times (conv/linear whose handler can
    rebuild it), by module name, from one eval-mode forward on ``example_inputs``; a layer
    called several times keeps its first shape, one never called is absent."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def record(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    for name, m in model.named_modules():
        if _timed(m):
            handles.append(m.register_forward_pre_hook(record(name)))
    try:
        with model_mode(model, "eval"), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def build_latency_table(model: nn.Module, example_inputs: Any, *, fractions: tuple[float, ...] = FRACTIONS,
                        threads: int | None = None, min_run_time: float = 0.02) -> LatencyTable:
    """Measure every conv/linear layer of ``model`` at a grid of width fractions on its own
    device (``threads`` intra-op threads on CPU) and the whole model once; returns the table.
    Fractions must be increasing and end at 1.0."""
    fractions = tuple(float(f) for f in fractions)
    if not fractions or fractions[-1] != 1.0 or any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError(f"fractions={fractions}: must increase and end at 1.0")
    shapes = layer_inputs(model, example_inputs)
    device = infer_device(model)
    threads = threads or torch.get_num_threads()
    cache: dict[tuple[Any, ...], float] = {}
    layers: dict[str, LayerTiming] = {}
    with _torch_threads(threads):
        for name, m in model.named_modules():
            if name not in shapes:
                continue
            shape = shapes[name]
            handler = handler_for(m)
            channel_dim = handler.in_channel_dim(m, len(shape)) if handler is not None else None
            assert channel_dim is not None  # timed layers read channels
            grid = np.zeros((len(fractions), len(fractions)))
            for i, fi in enumerate(fractions):
                for j, fo in enumerate(fractions):
                    layer, cin = _scaled(m, fi, fo)
                    key = (repr(layer), shape, channel_dim)
                    if key not in cache:
                        cache[key] = _time(layer, shape, channel_dim, cin, device, min_run_time)
                    grid[i, j] = cache[key]
            cin, cout = _widths(m)
            layers[name] = LayerTiming(cin, cout, grid)
        total = measure_latency(model, example_inputs, threads=threads, min_run_time=max(0.2, 10 * min_run_time))
    if not math.isfinite(total.median_ms):
        raise RuntimeError("could not time the model")
    return LatencyTable(layers, fractions, total.median_ms, str(device))
