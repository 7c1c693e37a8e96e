"""Per-layer latency at *exact* widths: what ``round_to="auto"`` reads to choose a channel multiple.

:class:`~prunekit.measure.latency_table.LatencyTable` interpolates a 4x4 grid of width
fractions, so it cannot see that 61 channels run slower than 64 (vectorised kernels pad odd
widths, ONNX Runtime and oneDNN pick other, slower kernels for them). A :class:`WidthTable`
instead times each conv/linear layer at the very ``(input, output)`` widths asked for, once per
layer configuration: layers with the same configuration and input shape (the repeated blocks of
a ResNet stage) share their timings, and every timing is cached in the table, so one table
serves every prune of the model (several ratios, several candidate multiples). A pruned copy's
latency is estimated as the original model's measured latency scaled by the sum of its tabled
layers at their widths over that sum at the original widths (as ``LatencyTable.estimate``
does), so the ops around the layers are taken to shrink with them.

The timing source is the table's ``timer``, a callable ``timer(spec, in_channels,
out_channels) -> ms`` given the layer's :class:`LayerSpec`: :class:`EagerTimer` (PyTorch eager on
the model's device), :class:`OnnxTimer` (ONNX Runtime on CPU: the single layer exported at its
input shape), or any function (a recorded or hand-made table: tests and offline planning use
one, so no test times anything). A table saved with :meth:`WidthTable.to_dict` and loaded with
:meth:`WidthTable.from_dict` answers the widths it recorded without timing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import nn

from prunekit.handlers import handler_for
from prunekit.measure.latency import _torch_threads, measure_latency
from prunekit.measure.latency_table import _scaled, _time, _widths, layer_inputs, time_calls
from prunekit.runtime import infer_device

__all__ = ["BACKENDS", "LayerSpec", "WidthTable", "EagerTimer", "OnnxTimer", "build_width_table"]

#: Backends a width table can time on.
BACKENDS: tuple[str, ...] = ("eager", "onnxruntime")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One tabled layer: its original widths, the shape of its input in the traced forward and
    the dim of that input holding channels; ``key`` (configuration and input shape) is shared by
    layers that are timed once for all; ``module`` is the original layer (None in a table loaded
    from JSON), which the timers rebuild at other widths."""

    name: str
    key: str
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    channel_dim: int
    module: nn.Module | None = dataclasses.field(default=None, compare=False, repr=False)


#: ``timer(spec, in_channels, out_channels) -> milliseconds`` of the layer at those widths.
Timer = Callable[[LayerSpec, int, int], float]


def _layer_at(spec: LayerSpec, cin: int, cout: int) -> nn.Module:
    """A fresh layer configured like ``spec.module`` at exactly ``(cin, cout)``."""
    if spec.module is None:
        raise ValueError(f"width table: layer {spec.name!r} has no module to rebuild (a loaded table): "
                         f"no timing recorded at widths ({cin}, {cout})")
    layer, _ = _scaled(spec.module, cin / spec.in_channels, cout / spec.out_channels)
    got = _widths(layer)
    if got != (cin, cout):
        raise ValueError(f"width table: layer {spec.name!r} cannot be built at widths ({cin}, {cout}) "
                         f"(its handler gives {got})")
    return layer


@dataclasses.dataclass(frozen=True)
class EagerTimer:
    """Times a layer in PyTorch eager mode on ``device`` with ``threads`` intra-op CPU threads
    (five blocks of about ``min_run_time / 5`` s, the median)."""

    device: str = "cpu"
    threads: int = 1
    min_run_time: float = 0.05

    def __call__(self, spec: LayerSpec, cin: int, cout: int) -> float:
        """Milliseconds per call of ``spec``'s layer at widths ``(cin, cout)``."""
        layer = _layer_at(spec, cin, cout)
        with _torch_threads(self.threads):
            return _time(layer, spec.input_shape, spec.channel_dim, cin, torch.device(self.device), self.min_run_time)


@dataclasses.dataclass(frozen=True)
class OnnxTimer:
    """Times a layer in ONNX Runtime on CPU with ``threads`` intra-op threads: the layer alone,
    exported at its input shape (five blocks of about ``min_run_time / 5`` s, the median)."""

    threads: int = 1
    min_run_time: float = 0.05

    def __call__(self, spec: LayerSpec, cin: int, cout: int) -> float:
        """Milliseconds per run of ``spec``'s layer at widths ``(cin, cout)``."""
        from prunekit.measure.onnx_latency import onnx_session

        layer = _layer_at(spec, cin, cout)
        shape = list(spec.input_shape)
        shape[spec.channel_dim] = cin
        session, feeds = onnx_session(layer, torch.randn(shape), self.threads)
        return time_calls(lambda: session.run(None, feeds), lambda: None, self.min_run_time)


@dataclasses.dataclass(frozen=True)
class WidthTable:
    """Latency of every tabled layer at exact widths (see the module docstring).

    ``layers`` maps module names to their :class:`LayerSpec`; ``times`` caches milliseconds by
    ``(spec.key, in_channels, out_channels)`` and grows as widths are asked for; ``model_ms``
    is the original model's latency on ``backend``/``device`` (with a custom timer and no
    measurement: the sum of its tabled layers at full width); ``timer`` times a missing entry
    (None: a recorded table, which answers only what it holds)."""

    layers: dict[str, LayerSpec]
    times: dict[tuple[str, int, int], float]
    model_ms: float
    backend: str
    device: str
    timer: Timer | None = dataclasses.field(default=None, compare=False, repr=False)

    def layer_ms(self, name: str, in_channels: int, out_channels: int) -> float:
        """Milliseconds of layer ``name`` at exactly these widths (timed once, then cached)."""
        spec = self.layers[name]
        key = (spec.key, int(in_channels), int(out_channels))
        if key not in self.times:
            if self.timer is None:
                raise ValueError(f"width table: no timing of layer {name!r} at widths ({in_channels}, "
                                 f"{out_channels}) and no timer to measure it")
            ms = float(self.timer(spec, int(in_channels), int(out_channels)))
            if not math.isfinite(ms) or ms < 0:
                raise ValueError(f"width table: timer gave {ms!r} ms for layer {name!r}")
            self.times[key] = ms
        return self.times[key]

    def widths(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """``(input, output)`` widths of every tabled layer present in ``model`` (a pruned copy
        of the tabled model, whose module names pruning keeps)."""
        mods = dict(model.named_modules())
        return {name: _widths(mods[name]) for name in self.layers if name in mods}

    def full_ms(self) -> float:
        """Sum of the tabled layers at their original widths."""
        return sum(self.layer_ms(n, s.in_channels, s.out_channels) for n, s in self.layers.items())

    def estimate(self, model: nn.Module) -> float:
        """Estimated latency (ms) of ``model``, a pruned copy of the tabled model: ``model_ms``
        times the sum of its layers at their widths over the sum at the original widths."""
        full = self.full_ms()
        now = sum(self.layer_ms(n, cin, cout) for n, (cin, cout) in self.widths(model).items())
        return self.model_ms * now / full if full > 0 else self.model_ms

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the first tabled layer that ``model`` (the unpruned model
        to plan on) lacks or has at other widths: the table was made for another model."""
        mods = dict(model.named_modules())
        for name, spec in self.layers.items():
            m = mods.get(name)
            handler = handler_for(m) if m is not None else None
            got = handler.widths(m) if handler is not None else None
            if got != (spec.in_channels, spec.out_channels):
                raise ValueError(f"width table: layer {name!r} is ({spec.in_channels}, {spec.out_channels}) in the "
                                 f"table but {'absent' if m is None else got} in the model")

    def to_dict(self) -> dict[str, Any]:
        """The table as JSON-able data (layers without their modules, every cached timing)."""
        return {"kind": "width", "backend": self.backend, "device": self.device, "model_ms": self.model_ms,
                "layers": {n: {"key": s.key, "in_channels": s.in_channels, "out_channels": s.out_channels,
                               "input_shape": list(s.input_shape), "channel_dim": s.channel_dim}
                           for n, s in self.layers.items()},
                "times": [[k, cin, cout, ms] for (k, cin, cout), ms in self.times.items()]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, model: nn.Module | None = None,
                  timer: Timer | None = None) -> WidthTable:
        """The table of :meth:`to_dict`; with ``model`` (the tabled model) and ``timer`` it
        can also time widths it did not record."""
        if data.get("kind") != "width":
            raise ValueError(f"width table: expected kind 'width', got {data.get('kind')!r}")
        mods = dict(model.named_modules()) if model is not None else {}
        layers = {n: LayerSpec(n, d["key"], int(d["in_channels"]), int(d["out_channels"]),
                               tuple(int(v) for v in d["input_shape"]), int(d["channel_dim"]), mods.get(n))
                  for n, d in data["layers"].items()}
        times = {(str(k), int(cin), int(cout)): float(ms) for k, cin, cout, ms in data["times"]}
        return cls(layers, times, float(data["model_ms"]), str(data["backend"]), str(data["device"]), timer)


def layer_specs(model: nn.Module, example_inputs: Any) -> dict[str, LayerSpec]:
    """A :class:`LayerSpec` for every conv/linear layer a table can time, from one forward."""
    specs = {}
    for name, shape in layer_inputs(model, example_inputs).items():
        m = model.get_submodule(name)
        handler = handler_for(m)
        channel_dim = handler.in_channel_dim(m, len(shape)) if handler is not None else None
        assert channel_dim is not None  # timed layers read channels
        cin, cout = _widths(m)
        specs[name] = LayerSpec(name, f"{m!r}@{tuple(shape)}", cin, cout, tuple(shape), channel_dim, m)
    return specs


def build_width_table(model: nn.Module, example_inputs: Any, *, backend: str = "eager", timer: Timer | None = None,
                      model_ms: float | None = None, threads: int | None = None,
                      min_run_time: float = 0.05) -> WidthTable:
    """The width table of ``model``: its layers' specs (one forward on ``example_inputs``), each
    distinct layer timed at its original widths, and the whole model's latency ``model_ms``
    (measured on ``backend`` unless given). ``backend`` is ``"eager"`` (PyTorch on the model's
    device) or ``"onnxruntime"`` (CPU; ImportError naming the extra when it is missing);
    ``timer`` replaces the backend's timer (then ``model_ms`` defaults to the sum of the layers:
    nothing is timed but by ``timer``). Other widths are timed when first asked for."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {', '.join(BACKENDS)}")
    threads = threads or torch.get_num_threads()
    device = infer_device(model)
    where = str(device) if backend == "eager" else "cpu"
    if timer is None:
        if backend == "eager":
            timer = EagerTimer(str(device), threads, min_run_time)
        else:
            from prunekit.measure.onnx_latency import onnxruntime_available

            if not onnxruntime_available():
                raise ImportError("width table: backend 'onnxruntime' needs onnx and onnxruntime: "
                                  "pip install 'prunekit[export]'")
            timer = OnnxTimer(threads, min_run_time)
        if model_ms is None:
            model_ms = _model_ms(model, example_inputs, backend, threads, max(0.2, 10 * min_run_time))
    table = WidthTable(layer_specs(model, example_inputs), {}, 0.0, backend, where, timer)
    full = table.full_ms()  # times every distinct layer at full width
    return dataclasses.replace(table, model_ms=float(full if model_ms is None else model_ms))


def _model_ms(model: nn.Module, example_inputs: Any, backend: str, threads: int, min_run_time: float) -> float:
    """The whole model's latency on ``backend``."""
    if backend == "eager":
        return measure_latency(model, example_inputs, threads=threads, min_run_time=min_run_time).median_ms
    from prunekit.measure.onnx_latency import measure_onnx_latency

    return measure_onnx_latency(model, example_inputs, threads=threads, min_run_time=min_run_time).median_ms
