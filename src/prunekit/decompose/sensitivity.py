"""Per-layer rank sensitivity tables (the AIMET way), computed on calibration data, saved as JSON.

For every factorisable layer and every candidate rank, the model is run with *only that layer*
factorised at that rank, and the damage is measured on calibration batches: by default the
relative output error ``sum ||f_r(x) - f(x)||^2 / sum ||f(x)||^2`` over the batches (no labels
needed), or with ``evaluate`` a score of your own (higher is better, e.g. accuracy; the error
is the drop from the unfactorised model's score), as AIMET's ``eval_callback``. The table is
what the ``"table"`` and ``"aimet"`` allocations of :func:`prunekit.decompose.decompose` use;
computing it costs one evaluation per layer and candidate, so save it and pass it again::

    table = compute_sensitivity(model, x, calib, mode="spatial")
    table.save("runs/r20/rank_sensitivity.json")
    decompose(model, x, mode="spatial", target_flops=0.45, allocation="aimet",
              sensitivity="runs/r20/rank_sensitivity.json")

The candidates are fractions of each layer's full rank (default 0.1, ..., 0.9), rounded up to
``round_to``, plus the smallest rank; the full rank counts as error 0. Between candidates the
error is interpolated linearly in the rank.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.decompose.layers import RankLayer, find_layers, round_rank
from prunekit.errors import PruningError
from prunekit.features import as_batch, call_on_device
from prunekit.runtime import atomic_write, first_tensor, model_mode

__all__ = ["FORMAT", "DEFAULT_CANDIDATES", "LayerSensitivity", "SensitivityTable", "candidate_ranks",
           "compute_sensitivity"]

FORMAT = "prunekit.rank_sensitivity/1"
DEFAULT_CANDIDATES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class LayerSensitivity:
    """One layer's row: its full rank, the measured ranks (ascending) and their errors
    (lower is better; with an ``evaluate`` metric also the raw scores)."""

    full_rank: int
    ranks: list[int]
    errors: list[float]
    scores: list[float] | None = None

    def error(self, rank: int) -> float:
        """The error at ``rank``: measured, or interpolated linearly between the measured ranks
        and the full rank (error 0); below the smallest measured rank, that rank's error."""
        if rank >= self.full_rank:
            return 0.0
        xs, ys = self.ranks + [self.full_rank], self.errors + [0.0]
        return float(np.interp(rank, xs, ys))


@dataclass
class SensitivityTable:
    """Rank sensitivity of a model's layers: ``mode`` (the factorisation measured), ``metric``
    (``"output_error"`` or ``"evaluate"``), ``base_score`` (the unfactorised model's score with
    ``evaluate``) and one :class:`LayerSensitivity` per layer name."""

    mode: str
    metric: str
    layers: dict[str, LayerSensitivity] = field(default_factory=dict)
    base_score: float | None = None

    def error(self, name: str, rank: int) -> float:
        """The (interpolated) error of layer ``name`` factorised alone at ``rank``."""
        return self.layers[name].error(rank)

    def check(self, layers: Sequence[RankLayer], mode: str) -> None:
        """Raise PruningError unless the table covers ``layers`` (same full ranks) in ``mode``:
        a table of another model, mode or ignore list must not be reused silently."""
        if self.mode != mode:
            raise PruningError(f"sensitivity: the table was computed for mode {self.mode!r}, not {mode!r}")
        for layer in layers:
            row = self.layers.get(layer.name)
            if row is None:
                raise PruningError(f"sensitivity: the table has no row for layer '{layer.name}' "
                                   "(recompute it, or ignore the layer)")
            if row.full_rank != layer.full_rank:
                raise PruningError(f"sensitivity: layer '{layer.name}' has full rank {layer.full_rank}, the table "
                                   f"{row.full_rank} (a table of another model?)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in format ``prunekit.rank_sensitivity/1``."""
        rows = {}
        for name, row in self.layers.items():
            rows[name] = {"full_rank": row.full_rank, "ranks": row.ranks, "errors": row.errors}
            if row.scores is not None:
                rows[name]["scores"] = row.scores
        return {"format": FORMAT, "mode": self.mode, "metric": self.metric, "base_score": self.base_score,
                "layers": rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityTable:
        """Inverse of :meth:`to_dict`; ValueError for another format."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a prunekit rank sensitivity table (format={data.get('format')!r})")
        layers = {name: LayerSensitivity(int(r["full_rank"]), [int(k) for k in r["ranks"]],
                                         [float(e) for e in r["errors"]], r.get("scores"))
                  for name, r in data["layers"].items()}
        return cls(data["mode"], data["metric"], layers, data.get("base_score"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as JSON to ``path`` (atomically); returns the path."""
        atomic_write(path, json.dumps(self.to_dict(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityTable:
        """Read a table written by :meth:`save`; ValueError naming the file if it is not one."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable rank sensitivity table ({exc})") from None


def candidate_ranks(full_rank: int, candidates: Iterable[float], round_to: int = 1) -> list[int]:
    """The ranks measured for a layer: each fraction of ``full_rank`` rounded up to
    ``round_to``, plus the smallest rank, below the full rank, ascending and distinct."""
    ranks = {round_rank(max(1, math.ceil(f * full_rank)), round_to, full_rank) for f in candidates}
    ranks.add(round_rank(1, round_to, full_rank))
    return sorted(r for r in ranks if r < full_rank)


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the module it replaced."""
    parent_name, _, key = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules[key]
    parent._modules[key] = new
    return old


def compute_sensitivity(model: nn.Module, example_inputs: Any, loader: Iterable[Any], *, mode: str = "channel",
                        candidates: Iterable[float] = DEFAULT_CANDIDATES, batches: int = 8,
                        evaluate: Callable[[nn.Module], float] | None = None,
                        ignore: Iterable[str] = (), round_to: int = 1) -> SensitivityTable:
    """The sensitivity table of ``model``'s factorisable layers in ``mode`` (module docstring):
    each layer factorised alone at each candidate rank, measured on the first ``batches``
    batches of ``loader`` (output error) or by ``evaluate(model) -> score`` (higher is better).
    ``ignore`` names layers left out. The model is not changed (a copy is measured)."""
    work = copy.deepcopy(model)
    rows_of, _ = find_layers(work, example_inputs, mode, ignore)
    data = [as_batch(b)[0] for b in itertools.islice(loader, batches)] if evaluate is None else []
    if evaluate is None and not data:
        raise PruningError("sensitivity: the calibration loader yielded no batches")
    candidates = tuple(candidates)
    if not candidates or not all(0 < f < 1 for f in candidates):
        raise PruningError(f"candidates={candidates!r}: fractions of the full rank in (0, 1)")
    with model_mode(work, "eval"), torch.no_grad():
        def outputs() -> list[torch.Tensor]:
            out = []
            for x in data:
                y = first_tensor(call_on_device(work, x))
                if y is None:
                    raise PruningError("sensitivity: the model's output holds no tensor to compare")
                out.append(y.double())
            return out

        ref = outputs() if evaluate is None else []
        ref_energy = sum(float(y.square().sum()) for y in ref)
        base = float(evaluate(work)) if evaluate is not None else None
        table = SensitivityTable(mode, "evaluate" if evaluate is not None else "output_error", {}, base)
        for layer in rows_of:
            ranks = candidate_ranks(layer.full_rank, candidates, round_to)
            errors, scores = [], []
            for r in ranks:
                old = _swap(work, layer.name, layer.factorise(r).eval())
                try:
                    if evaluate is None:
                        diff = sum(float((y - y0).square().sum()) for y, y0 in zip(outputs(), ref))
                        errors.append(diff / ref_energy if ref_energy > 0 else diff)
                    else:
                        score = float(evaluate(work))
                        scores.append(score)
                        errors.append(base - score)  # type: ignore[operator]
                finally:
                    _swap(work, layer.name, old)
            table.layers[layer.name] = LayerSensitivity(layer.full_rank, ranks, errors,
                                                        scores if evaluate is not None else None)
    return table
