"""Shared low-level pieces for data-driven criteria and recovery: calling a model on
calibration batches, and a layer's input as rows of receptive fields (with their moments)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.handlers import handler_for
from prunekit.runtime import call_model, infer_device, to_device

Batch = tuple[Any, Tensor | None]
"""One calibration batch: ``(inputs, targets or None)``."""


def as_batch(item: Any) -> Batch:
    """One loader item as ``(inputs, targets or None)``: a tuple/list gives its first two
    entries, anything else is inputs without targets."""
    if isinstance(item, (tuple, list)):
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def call_on_device(model: nn.Module, x: Any) -> Any:
    """Call ``model`` on a batch's inputs (see :func:`prunekit.runtime.call_model`), moved to its device."""
    return call_model(model, to_device(x, infer_device(model, x)))


def call_with_hooks(model: nn.Module, x: Any, handles: list[Any]) -> Any:
    """Call ``model`` on ``x`` (on its device, without gradients) once and remove the hook
    ``handles`` afterwards, also when the call fails. Returns the output."""
    try:
        with torch.no_grad():
            return call_on_device(model, x)
    finally:
        for h in handles:
            h.remove()


def reconstructable(m: nn.Module) -> bool:
    """Layers whose handler unfolds their input (linear; ungrouped 1-D/2-D conv with zero
    padding): the ones least squares can rewrite."""
    handler = handler_for(m)
    return handler is not None and handler.unfolds(m)


def unfold_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows of its receptive fields: ``(positions, in_features)`` with
    features ordered like ``weight.flatten(1)`` (channel-major, then kernel offsets); only for
    :func:`reconstructable` layers (ValueError otherwise)."""
    handler = handler_for(layer)
    if handler is None or not handler.unfolds(layer):
        raise ValueError(f"cannot unfold the input of {type(layer).__name__}")
    return handler.unfold_input(layer, x)


def output_rows(layer: nn.Module, y: Tensor) -> Tensor:
    """The layer's output as ``(positions, out_features)``, matching :func:`unfold_rows`: its
    handler's output channel dim moved last, every other dim a position."""
    handler = handler_for(layer)
    d = handler.out_channel_dim(layer, y.ndim) if handler is not None else None
    if d is None:
        raise ValueError(f"{type(layer).__name__} has no output channel dim")
    return y.movedim(d, -1).reshape(-1, y.shape[d])


class Capture:
    """Forward hooks that keep one module's input (``what="in"``) or output (``"out"``) of its
    latest call in ``value`` (detached); :meth:`close` removes the hook."""

    def __init__(self, layer: nn.Module, what: str) -> None:
        self.value: Tensor | None = None
        if what == "in":
            self.handle = layer.register_forward_pre_hook(lambda m, a: setattr(self, "value", a[0].detach()))
        else:
            self.handle = layer.register_forward_hook(lambda m, a, o: setattr(self, "value", o.detach()))

    def close(self) -> None:
        """Remove the hook."""
        self.handle.remove()


@dataclass
class Moments:
    """Running sums for least squares: ``xx = sum x~ x~^T`` and ``xy = sum x~ y^T`` with
    ``x~ = [x; 1]``, in float64."""

    xx: Tensor
    xy: Tensor | None
    count: int = 0

    @classmethod
    def empty(cls, n_in: int, n_out: int | None) -> Moments:
        """Zeroed sums for ``n_in`` inputs (plus the constant) and ``n_out`` targets (None: inputs only)."""
        xy = torch.zeros(n_in + 1, n_out, dtype=torch.float64) if n_out is not None else None
        return cls(torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64), xy)

    def add(self, x: Tensor, y: Tensor | None = None) -> None:
        """Accumulate rows ``x`` (and targets ``y``)."""
        xt = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)
        self.xx += (xt.T @ xt).cpu()
        if y is not None and self.xy is not None:
            self.xy += (xt.T @ y.double()).cpu()
        self.count += len(x)


RowSelect = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``select(input_rows, output_rows, layer_input) -> (input_rows, output_rows)``: which rows of
one batch :func:`layer_moments` adds (e.g. kept output channels, sampled positions)."""


def layer_moments(model: nn.Module, layer: nn.Module, target_model: nn.Module, target_layer: nn.Module,
                  batches: Iterable[Batch], select: RowSelect | None = None) -> Moments:
    """The least-squares sums of ``layer``'s input in ``model`` (as rows of receptive fields,
    :func:`unfold_rows`) against ``target_layer``'s output in ``target_model`` (as rows,
    :func:`output_rows`), over ``batches``: both models are called on every batch, without
    gradients. ``select`` may slice or sample each batch's rows. Returns the :class:`Moments`;
    the hooks are removed afterwards."""
    return paired_moments(model, [layer], target_model, [target_layer], batches, [select])[0]


def paired_moments(model: nn.Module, layers: list[nn.Module], target_model: nn.Module, target_layers: list[nn.Module],
                   batches: Iterable[Batch], selects: list[RowSelect | None]) -> list[Moments]:
    """:func:`layer_moments` of several (layer, target layer, select) triples at once: each model
    is called once per batch for all of them. Returns one :class:`Moments` per layer."""
    caps_in = [Capture(layer, "in") for layer in layers]
    caps_out = [Capture(layer, "out") for layer in target_layers]
    moms: list[Moments | None] = [None] * len(layers)
    try:
        with torch.no_grad():
            for x, _ in batches:
                call_on_device(model, x)
                call_on_device(target_model, x)
                for i, (layer, target, cin, cout) in enumerate(zip(layers, target_layers, caps_in, caps_out)):
                    assert cin.value is not None and cout.value is not None
                    xr, yr = unfold_rows(layer, cin.value), output_rows(target, cout.value)
                    if selects[i] is not None:
                        xr, yr = selects[i](xr, yr, cin.value)  # type: ignore[misc]
                    if moms[i] is None:
                        moms[i] = Moments.empty(xr.shape[1], yr.shape[1])
                    moms[i].add(xr, yr)  # type: ignore[union-attr]
    finally:
        for cap in caps_in + caps_out:
            cap.close()
    if any(m is None for m in moms):
        raise ValueError("layer_moments needs at least one batch")
    return moms  # type: ignore[return-value]
