"""Record the output shapes of every torch call of one forward pass (no channel rules):
what validation compares a pruned model against."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from prunekit.graph.meta import MetaStandIns, meta_shortcut, meta_tensors, to_meta
from prunekit.graph.tracer import call_outputs, op_name
from prunekit.runtime import call, inputs_for, model_mode


class ShapeRecorder(TorchFunctionMode):
    """Records the name and output shapes of every torch call that produces tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = meta_shortcut(func, args, kwargs or {})
        if out is None:
            out = func(*args, **(kwargs or {}))
        outs = call_outputs(func, args, out)  # the calls the tracer records, ``x[idx] = y`` included
        if outs:
            self.calls.append((op_name(func), [tuple(t.shape) for t in outs]))
        return out


Calls = list[tuple[str, list[tuple[int, ...]]]]


def record_shapes(model: nn.Module, example_inputs: Any, mode: str, *, meta: bool,
                  swapped: MetaStandIns | None = None) -> tuple[Calls, str | None]:
    """Run ``model`` once in ``mode`` and return its calls (name, output shapes) and the
    first line of the error it raised, if any (``swapped``: meta stand-ins to reuse)."""
    rec = ShapeRecorder()
    error: str | None = None
    try:
        swapped = (swapped if swapped is not None else meta_tensors(model)) if meta else None
        example_inputs = inputs_for(example_inputs, mode)
        inputs = to_meta(example_inputs) if meta else example_inputs
        with model_mode(model, mode), torch.no_grad(), rec:
            call(model, inputs, swapped)
    except Exception as exc:  # noqa: BLE001 - a failing forward is reported, not raised
        error = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return rec.calls, error
