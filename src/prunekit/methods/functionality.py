"""Functionality-oriented filter pruning (Qin, Yu, Liu & Chen 2018).

  1. describe each filter by its activation maps on calibration data;
  2. cluster filters whose maps are near duplicates (cosine, agglomerative);
  3. keep one representative per cluster (the strongest), remove the rest; the budget
     fixes the number of clusters (criterion ``functionality``);
  4. no retraining is needed by design; ``compensate=True`` additionally re-solves the next
     layers by least squares, which suits this method: a removed duplicate is almost
     exactly a multiple of its representative, so compensation restores it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

import prunekit as pk
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.recover.reconstruct import reconstruct


@register("functionality")
def functionality(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
                  batches: int = 8, compensate: bool = False, seed: int = 0, **kwargs: Any) -> MethodResult:
    """Remove functionally redundant channels (one kept per cluster of similar activation
    maps) under the budget in ``kwargs``; optionally compensate the next layers. Returns
    the pruned model and its plan."""
    cfg = budget_config(kwargs, "functionality")
    calib = take_batches(loader, batches, "functionality")
    small, plan = pk.prune(model, example_inputs, config=cfg, criterion="functionality",
                           criterion_kwargs={"loader": calib, "batches": len(calib), "seed": seed}, return_plan=True)
    layers = reconstruct(small, model, plan, calib, mode="oneshot", seed=seed) if compensate else []
    return MethodResult(small, plan, {"criterion": "functionality", "reconstructed": layers})
