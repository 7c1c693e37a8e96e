"""Save and load pruned models without pickling code.

A saved model is a directory holding ``model.safetensors`` (the pruned weights) and
``plan.json`` (the :class:`PruningPlan`). Loading builds the *original* architecture,
applies the plan to get the pruned shapes, then loads the weights strictly. Files are
written atomically (temporary file + ``os.replace``) so a crash never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import nn

from prunekit.plan import PruningPlan
from prunekit.runtime import atomic_write, default_file_mode as _default_mode
from prunekit.surgery import apply_plan

WEIGHTS = "model.safetensors"
PLAN = "plan.json"


def save(model: nn.Module, plan: PruningPlan, directory: str | os.PathLike[str], *,
         model_spec: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save a pruned ``model`` and its ``plan`` to ``directory``; returns the directory.

    ``model_spec`` (e.g. ``"torchvision:resnet50"``) lets :func:`load` rebuild the
    original architecture by itself.
    """
    from safetensors.torch import save_model

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(plan.meta)
    if model_spec is not None:
        meta["model_spec"] = model_spec
    if extra:
        meta.update(extra)
    full = dataclasses.replace(plan, meta=meta)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{WEIGHTS}.", suffix=".tmp")
    os.close(fd)
    try:
        save_model(model, tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, out / WEIGHTS)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write(out / PLAN, full.to_json())
    return out


def load_plan(directory: str | os.PathLike[str]) -> PruningPlan:
    """Read the plan saved in ``directory``."""
    path = Path(directory) / PLAN
    if not path.exists():
        raise FileNotFoundError(f"{path}: no plan.json (was this directory written by prunekit.save?)")
    return PruningPlan.from_json(path.read_text())


def load(directory: str | os.PathLike[str], model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Load a pruned model saved by :func:`save`.

    ``model`` is a freshly built *original* (unpruned) model or a function building one;
    if omitted, the ``model_spec`` recorded at save time is resolved through the zoo.
    Returns the pruned model with its weights loaded (strict).
    """
    from safetensors.torch import load_model

    plan = load_plan(directory)
    if model is None:
        spec = plan.meta.get("model_spec")
        if not spec:
            raise ValueError(f"{directory}: no model_spec saved; pass the original architecture as `model`")
        from prunekit.zoo import resolve_model

        kwargs = {k: plan.meta[k] for k in ("num_classes", "in_chans") if k in plan.meta}
        model = resolve_model(spec, **kwargs)
    elif not isinstance(model, nn.Module):
        model = model()
    pruned = apply_plan(model, plan, inplace=True)
    weights = Path(directory) / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: missing weights file")
    load_model(pruned, str(weights), strict=True)
    return pruned
