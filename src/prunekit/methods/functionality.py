"""Activation-clustering proxy after Qin et al. (functionality-oriented filter pruning, Qin,
Yu, Liu & Chen 2018). The paper interprets each filter's function and prunes repeated ones;
its similarity measure is not public, so this method is a proxy for it, not the paper's
algorithm, and does not inherit the paper's claim that no retraining is needed:

  1. describe each filter by its activation maps on calibration data (at its activation
     output, see :mod:`prunekit.criteria.data`);
  2. cluster filters whose maps are near duplicates (cosine, agglomerative);
  3. keep one representative per cluster (the strongest), remove the rest; the budget
     fixes the number of clusters (criterion ``functionality``);
  4. ``compensate=True`` additionally re-solves the next layers by least squares, which
     suits the selection: a removed duplicate is almost exactly a multiple of its
     representative, so compensation restores it. Without it (or fine-tuning) do not
     expect the paper's "no retraining needed" result from this proxy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

import prunekit as pk
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.recover.reconstruct import reconstruct


FUNCTIONALITY_LABEL = "activation-clustering proxy after Qin et al."
"""What the ``functionality`` method and criterion are, as recorded in results."""


@register("functionality")
def functionality(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
                  batches: int = 8, compensate: bool = False, seed: int = 0, **kwargs: Any) -> MethodResult:
    """Activation-clustering proxy after Qin et al.: remove redundant channels (one kept per
    cluster of similar activation maps) under the budget in ``kwargs``; optionally compensate
    the next layers. Returns the pruned model and its plan; ``info["method"]`` and
    ``plan.meta["criterion_label"]`` name the proxy."""
    cfg = budget_config(kwargs, "functionality")
    calib = take_batches(loader, batches, "functionality")
    small, plan = pk.prune(model, example_inputs, config=cfg, criterion="functionality",
                           criterion_kwargs={"loader": calib, "batches": len(calib), "seed": seed}, return_plan=True)
    plan = plan.with_meta(criterion_label=FUNCTIONALITY_LABEL)
    layers = reconstruct(small, model, plan, calib, mode="oneshot", seed=seed) if compensate else []
    return MethodResult(small, plan, {"criterion": "functionality", "method": FUNCTIONALITY_LABEL,
                                      "reconstructed": layers})
