"""Channel Pruning (He, Zhang & Sun, ICCV 2017): LASSO channel selection + least squares.

Algorithm, per coupled group of channels (a residual stage is one problem, all its
consumers stacked):
  1. sample receptive fields of the consumers' inputs on calibration data;
  2. order the channels by the exact positive-LASSO path of their contributions to the
     consumers' outputs (criterion ``lasso``, LARS breakpoints): the top-k are the LASSO
     support with exactly k channels, the set the authors reach by bisecting the penalty;
  3. remove the others (the budget decides how many per group);
  4. reconstruct every consumer by least squares, layer by layer in execution order, from
     the *pruned* network's inputs to the *original* network's outputs, so that errors do
     not accumulate.

Departures from the paper:
  * selection (step 2) runs on the *original* network for all groups at once, not on the
    partially pruned one layer by layer; only the reconstruction (step 4) sees the pruned
    network's inputs;
  * the paper alternates LASSO and least squares until ``beta`` is stable; here one LASSO
    selection is followed by one least-squares reconstruction;
  * no multi-branch correction: a consumer is reconstructed towards its own original output,
    not towards the block output with the shortcut's error added (``Y1 - Y1' + Y2``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

import prunekit as pk
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.recover.reconstruct import reconstruct


@register("channel_pruning")
def channel_pruning(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
                    batches: int = 8, positions: int = 16, reconstruct_layers: bool = True,
                    seed: int = 0, **kwargs: Any) -> MethodResult:
    """Prune ``model`` by LASSO selection and least-squares reconstruction (He et al. 2017)
    under the budget in ``kwargs`` (see :func:`prunekit.methods.budget_config`); ``positions``
    receptive fields per image are sampled. Returns the pruned, reconstructed model and its plan."""
    cfg = budget_config(kwargs, "channel_pruning")
    calib = take_batches(loader, batches, "channel_pruning")
    small, plan = pk.prune(model, example_inputs, config=cfg, criterion="lasso",
                           criterion_kwargs={"loader": calib, "batches": len(calib), "seed": seed}, return_plan=True)
    layers = reconstruct(small, model, plan, calib, mode="sequential", positions=positions, seed=seed) \
        if reconstruct_layers else []
    return MethodResult(small, plan, {"criterion": "lasso", "reconstructed": layers})
