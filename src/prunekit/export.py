"""ONNX export with a numerical check against PyTorch (onnx/onnxruntime: the ``export`` extra)."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.runtime import atomic_path, model_mode

__all__ = ["export_onnx", "OnnxCheckError", "check_destination", "supported_opsets"]
log = logging.getLogger(__name__)

_MISSING = "ONNX export needs the optional packages onnx and onnxruntime: pip install 'prunekit[export]'"


class OnnxCheckError(RuntimeError):
    """The exported graph's outputs differ from PyTorch's; ``figures`` holds the comparison."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


def _require(name: str) -> Any:
    """Import an optional dependency or raise ImportError with the install hint."""
    try:
        return __import__(name)
    except ImportError as exc:
        raise ImportError(f"{_MISSING} ({name} is not installed: {exc})") from None


def supported_opsets() -> range | None:
    """The ONNX opsets this torch can export (None when it does not say)."""
    try:  # a private module: a torch without it leaves the check to the exporter
        from torch.onnx import _constants

        return range(_constants.ONNX_MIN_OPSET, _constants.ONNX_MAX_OPSET + 1)
    except (ImportError, AttributeError):
        return None


def check_destination(path: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` naming ``path`` when an ONNX file cannot be written there: it is a
    directory, lies below a regular file, or its directory (or the nearest one that exists,
    where the missing ones would be made) does not accept new files. Run before exporting,
    so that a bad path fails at once instead of after the whole export."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{path}: is a directory; give the .onnx file to write")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: {parent} is a file, not a directory")
    try:  # the only reliable test (permissions, read-only mounts, special file systems) is to try
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ValueError(f"{path}: cannot create files in {parent} ({exc.strerror or exc})") from None


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, dict):
        example_inputs = tuple(example_inputs.values())
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("export_onnx: example_inputs must be a tensor, a tuple of tensors or a dict of them")
    return inputs


class _KeywordInputs(nn.Module):
    """``model`` called with keyword inputs (a transformers model's ``input_ids``,
    ``attention_mask``) from positional ones, returning its first output (``logits``,
    ``last_hidden_state``): the form both ONNX exporters take."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, tensors)))
        return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: str, opset: int, dynamic_batch: bool,
            names: list[str] | None = None) -> str:
    """Export with the TorchScript exporter (fast, honours the opset); fall back to dynamo."""
    names = names or [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = {n: {0: "batch"} for n in [*names, "output"]} if dynamic_batch else None
            torch.onnx.export(model, inputs, path, input_names=names, output_names=["output"], opset_version=opset,
                              dynamic_axes=axes, dynamo=False)
        return "torchscript"
    except Exception as first:  # noqa: BLE001 - the legacy exporter may be gone or fail on new ops
        log.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", first)
        _require("onnxscript")
        shapes = tuple({0: torch.export.Dim("batch")} for _ in inputs) if dynamic_batch else None
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # its progress chatter
            torch.onnx.export(model, inputs, path, input_names=names, output_names=["output"], opset_version=opset,
                              dynamic_shapes=shapes, dynamo=True, external_data=False)
        return "dynamo"


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], *, opset: int = 17,
                check: bool = True, atol: float = 1e-4, rtol: float = 1e-3, dynamic_batch: bool = True,
                seed: int = 0) -> dict[str, Any]:
    """Write ``model`` (in eval mode, on CPU) to the ONNX file ``path`` and check it with onnxruntime.

    ``example_inputs`` (a tensor, a tuple of tensors, or a dict of keyword tensors such as a
    transformers model's ``input_ids`` and ``attention_mask``, exported under those names with
    the model's first output) fixes the input shapes; the batch axis
    stays dynamic unless ``dynamic_batch=False``. With ``check`` a fresh random input (seeded
    by ``seed``) of the same shapes is run through PyTorch and onnxruntime and the outputs
    compared elementwise with ``|ort - torch| <= atol + rtol * |torch|``. The file is written
    to a temporary name and only renamed onto ``path`` once it passed the check, so an
    existing ``path`` is never left half-written or replaced by a bad graph.

    Returns ``{"path", "opset", "exporter", "bytes", "checked", "max_abs_diff",
    "max_rel_diff", "atol", "rtol", "match"}``. Raises ``ImportError`` (install hint) if
    onnx/onnxruntime are missing, ``ValueError`` for an opset torch cannot export or a
    ``path`` that cannot be written (:func:`check_destination`), before any work, and
    :class:`OnnxCheckError` if the outputs differ.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime") if check else None
    opsets = supported_opsets()
    if opsets is not None and opset not in opsets:
        raise ValueError(f"opset {opset}: this torch exports opsets {opsets.start} to {opsets.stop - 1}")
    check_destination(path)
    inputs = tuple(t.detach().cpu() for t in _as_tuple(example_inputs))
    if any(t.device.type != "cpu" for t in model.state_dict().values()):
        model = copy.deepcopy(model).cpu()  # never move the caller's model
    names = None
    if isinstance(example_inputs, dict):  # keyword inputs keep their names in the ONNX graph
        names = [str(k) for k in example_inputs]
        model = _KeywordInputs(model, names)
    out = Path(path)
    with model_mode(model, "eval"), atomic_path(out) as tmp_path:
        tmp = str(tmp_path)
        exporter = _export(model, inputs, tmp, opset, dynamic_batch, names)
        onnx.checker.check_model(tmp)
        figures: dict[str, Any] = {"path": str(out), "opset": opset, "exporter": exporter,
                                   "bytes": os.path.getsize(tmp), "checked": bool(check)}
        if ort is not None:
            gen = torch.Generator().manual_seed(seed)
            feeds = [torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.is_floating_point() else t for t in inputs]
            with torch.no_grad():
                ref = model(*feeds)
            ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            got = sess.run(None, {i.name: f.numpy() for i, f in zip(sess.get_inputs(), feeds)})[0]
            got_t = torch.from_numpy(got)
            diff = (got_t - ref).abs()
            figures.update(max_abs_diff=float(diff.max()), max_rel_diff=float((diff / ref.abs().clamp_min(1e-12)).max()),
                           atol=atol, rtol=rtol, shape=list(got.shape),
                           match=bool(got_t.shape == ref.shape and torch.all(diff <= atol + rtol * ref.abs())))
            if not figures["match"]:
                raise OnnxCheckError(f"ONNX output differs from PyTorch: max abs diff {figures['max_abs_diff']:.3g} "
                                     f"(tolerance {atol:g} + {rtol:g}*|y|); {out} not written", figures)
        return figures
