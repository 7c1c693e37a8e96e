"""Save and load pruned models without pickling code.

A saved model is a directory holding ``model.safetensors`` (the pruned weights) and
``plan.json`` (the :class:`PruningPlan`). Loading builds the *original* architecture,
applies the plan to get the pruned shapes, then loads the weights strictly.

Writing is atomic for the directory as a whole (decision, issue 14): every file of a save
(and of a CLI run: report, recipe, plot) is written into a fresh sibling directory that
then replaces ``DIR`` by rename (:func:`prunekit.runtime.atomic_directory`). A per-file
replace cannot do this (a crash between two files pairs one model's weights with another's
plan), and a checksum manifest alone would only turn such a mix into an error, whereas the
switch leaves a reader the complete old run or the complete new one, never a mix and never
a refusal. Files in ``DIR`` that the save did not write (a user's notes, ``checkpoint.pt``)
are carried into the new directory, so they survive. The one moment ``DIR`` is missing
(between renaming it aside and renaming the new one in) is covered on the reading side:
:func:`load` and :func:`load_plan` read through :func:`prunekit.runtime.readable_directory`,
which then gives the directory moved aside, and both files are read from that one directory.

Loading runs no code from the directory: a ``model_spec`` naming a Python file
(``path/to/file.py:build``) is only imported when the caller passes ``trust_code=True``
(or the architecture itself); zoo, ``torchvision:`` and ``timm:`` names build installed
code and are always allowed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

from prunekit.plan import PruningPlan
# atomic_write is re-exported: report, plot, recover.train, analyze and the CLI import it from here.
from prunekit.runtime import atomic_directory, atomic_write, readable_directory  # noqa: F401
from prunekit.surgery import apply_plan

WEIGHTS = "model.safetensors"
PLAN = "plan.json"


class UntrustedCodeError(ValueError):
    """A saved run names a Python file to build its model from and the caller did not opt in."""


def save(model: nn.Module, plan: PruningPlan, directory: str | os.PathLike[str], *,
         model_spec: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save a pruned ``model`` and its ``plan`` to ``directory``; returns the directory.

    ``model_spec`` (e.g. ``"torchvision:resnet50"``) lets :func:`load` rebuild the
    original architecture by itself. The directory is replaced as a whole (see the module
    docstring); other files already in it are kept.
    """
    with atomic_directory(directory) as tmp:
        write_model(model, plan, tmp, model_spec=model_spec, extra=extra)
    return Path(directory)


def write_model(model: nn.Module, plan: PruningPlan, directory: Path, *,
                model_spec: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``plan.json`` into ``directory`` with plain writes: the
    directory must be one being written by :func:`prunekit.runtime.atomic_directory` (as
    :func:`save` and the CLI do), which makes the whole run appear at once."""
    from safetensors.torch import save_model

    meta = dict(plan.meta)
    if model_spec is not None:
        meta["model_spec"] = model_spec
    if extra:
        meta.update(extra)
    save_model(model, str(directory / WEIGHTS))
    (directory / PLAN).write_text(dataclasses.replace(plan, meta=meta).to_json())


def load_plan(directory: str | os.PathLike[str]) -> PruningPlan:
    """Read the plan saved in ``directory``."""
    return _read_plan(directory, readable_directory(directory))


def _read_plan(directory: str | os.PathLike[str], where: Path) -> PruningPlan:
    """The plan in ``where`` (``directory`` as :func:`readable_directory` resolved it); errors name ``directory``."""
    path = where / PLAN
    if not path.exists():
        raise FileNotFoundError(f"{Path(directory) / PLAN}: no plan.json (was this directory written by prunekit.save?)")
    try:
        return PruningPlan.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # truncated or hand-edited JSON
        raise ValueError(f"{Path(directory) / PLAN}: not a readable prunekit plan ({exc})") from None


def build_original(model: nn.Module | Callable[[], nn.Module] | None, meta: dict[str, Any], source: Path, *,
                   trust_code: bool = False) -> nn.Module:
    """The original (unpruned) architecture of a saved run: ``model`` itself, or what the
    builder ``model`` returns, or, when None, the ``model_spec`` of ``meta`` resolved through
    the zoo (with its ``num_classes`` / ``in_chans``). ``source`` (the file ``meta`` came from)
    names the run in errors: ValueError without a spec, :class:`UntrustedCodeError` for a spec
    naming a Python file unless ``trust_code``."""
    if isinstance(model, nn.Module):
        return model
    if model is not None:
        return model()
    spec = meta.get("model_spec")
    if not spec:
        raise ValueError(f"{source.parent}: no model_spec saved; pass the original architecture as `model`")
    from prunekit.zoo import resolve_model
    from prunekit.zoo.resolve import is_file_spec

    if is_file_spec(spec) and not trust_code:
        raise UntrustedCodeError(
            f"{source} names code to run (model_spec {spec!r}); pass the architecture "
            "(pk.load(dir, builder)) or trust_code=True / --trust-code to run it")
    kwargs = {k: meta[k] for k in ("num_classes", "in_chans") if k in meta}
    return resolve_model(spec, **kwargs)


def load(directory: str | os.PathLike[str], model: nn.Module | Callable[[], nn.Module] | None = None, *,
         trust_code: bool = False) -> nn.Module:
    """Load a pruned model saved by :func:`save`.

    ``model`` is a freshly built *original* (unpruned) model or a function building one;
    if omitted, the ``model_spec`` recorded at save time is resolved through the zoo. A
    spec naming a Python file would import and run that file (possibly one shipped with
    the directory), so it raises :class:`UntrustedCodeError` unless ``trust_code=True``.
    Returns the pruned model with its weights loaded (strict).
    """
    from safetensors.torch import load_model

    where = readable_directory(directory)  # plan and weights from one directory, even mid-switch
    plan = _read_plan(directory, where)
    model = build_original(model, plan.meta, Path(directory) / PLAN, trust_code=trust_code)
    pruned = apply_plan(model, plan, inplace=True)
    weights = where / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{Path(directory) / WEIGHTS}: missing weights file")
    try:
        load_model(pruned, str(weights), strict=True)
    except RuntimeError as exc:  # the weights are those of another plan or architecture
        raise ValueError(f"{Path(directory) / WEIGHTS}: the weights do not fit the model the plan builds "
                         f"({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a truncated/garbage file
        raise ValueError(f"{Path(directory) / WEIGHTS}: not a readable safetensors file "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return pruned
