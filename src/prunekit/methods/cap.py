"""Pruning with compensation and compensation-aware pruning, CaP (Xie et al. 2021).

  1. gather the consumers' input statistics (second moments) on a small calibration set;
  2. order the channels of each group by greedy joint selection (criterion ``cap``): each
     step removes the channel whose removal, given those already removed, raises the
     consumers' reconstruction loss *after* their remaining weights are re-solved in closed
     form least (Schur-complement updates of the inverse input moments); the budget takes a
     prefix of that order;
  3. compensate: re-solve every consumer's weights (and offset) by least squares from the
     original network's statistics, in one pass; no fine-tuning;
  4. optionally (``evaluate=``) choose per-group ratios bottom-up by binary search: group k
     of K (counting from 1, earlier groups' ratios fixed) takes the largest ratio whose
     compensated model still scores at least ``original - tolerance * k / K``, a threshold
     falling linearly to ``original - tolerance`` at the last group (the "step constraint"),
     so early groups cannot spend the whole accuracy budget. With ``steps`` halvings of
     ``[0, max_ratio]`` the ratio found is the largest multiple of ``max_ratio / 2**steps``
     below ``max_ratio`` that passes, provided the score falls as the ratio grows;
  5. prunekit's addition, not in the paper: given a budget as well (``target_flops=`` etc.),
     the searched ratios are one profile, scaled by a common factor (each capped at
     ``max_ratio``) to the largest factor that meets the budget, so the search can be
     compared with other methods at equal FLOPs. Groups the search left unpruned stay so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from torch import nn

import prunekit as pk
from prunekit import criteria
from prunekit.allocate.budget import make_budget
from prunekit.config import PruneConfig
from prunekit.errors import PruningError
from prunekit.features import Batch
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.plan import PruningPlan
from prunekit.recover.reconstruct import reconstruct

log = logging.getLogger(__name__)


def compensated(model: nn.Module, example_inputs: Any, calib: list[Batch], *, graph: Any, scores: list[np.ndarray],
                config: PruneConfig, seed: int = 0) -> tuple[nn.Module, PruningPlan]:
    """Prune by the given scores under the budget of ``config`` (its ``ignore`` is already in
    ``graph``) and compensate the consumers in one pass; returns the pruned model and its plan."""
    small, plan = pk.prune(model, example_inputs, config=config, graph=graph,
                           criterion=lambda m, g, **c: scores[g.index], return_plan=True)
    if not plan.is_empty:
        reconstruct(small, model, plan, calib, mode="oneshot", seed=seed)
    return small, plan


def search_ratios(model: nn.Module, example_inputs: Any, calib: list[Batch], evaluate: Callable[[nn.Module], float], *,
                  graph: Any, scores: list[np.ndarray], tolerance: float = 0.02, max_ratio: float = 0.9,
                  steps: int = 4, seed: int = 0) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Bottom-up binary search of one ratio per prunable group (keyed by its first producing
    module) under the step constraint; returns the ratios and a log of every trial."""
    base = float(evaluate(model))
    groups = [g for g in graph.groups if g.n_prunable > 0 and g.modules()]
    ratios: dict[str, float] = {}
    trials: list[dict[str, Any]] = []
    for k, g in enumerate(groups):
        threshold = base - tolerance * (k + 1) / len(groups)
        key = g.modules()[0]
        lo, hi = 0.0, max_ratio
        for _ in range(steps):
            mid = (lo + hi) / 2
            try:
                small, _ = compensated(model, example_inputs, calib, graph=graph, scores=scores, seed=seed,
                                       config=PruneConfig(ratio=0.0, ratios={**ratios, key: mid}))
                acc = float(evaluate(small))
            except (PruningError, RuntimeError) as exc:  # e.g. a singular system: treat as too far
                log.info("group %s ratio %.3f failed: %s", key, mid, exc)
                acc = -np.inf
            trials.append({"group": key, "ratio": mid, "score": acc, "threshold": threshold})
            lo, hi = (mid, hi) if acc >= threshold else (lo, mid)
        if lo > 0:
            ratios[key] = lo
    return ratios, trials


def scale_to_budget(model: nn.Module, example_inputs: Any, ratios: dict[str, float], budget: PruneConfig, *,
                    graph: Any, scores: list[np.ndarray], max_ratio: float = 0.9) -> tuple[dict[str, float], float]:
    """The per-group ``ratios`` times one factor ``s`` (each capped at ``max_ratio``), for the
    largest ``s`` whose pruned model keeps at most ``budget``'s target fraction (as close to it
    as one channel allows); returns the scaled ratios and ``s``. Raises :class:`PruningError`
    when the ratios are all zero or even every group at ``max_ratio`` misses the target."""
    target = make_budget(model, example_inputs, budget)
    if target is None:
        raise PruningError("cap: scale_to_budget needs a budget (target_flops, target_params or target_latency)")
    if not any(r > 0 for r in ratios.values()):
        raise PruningError(f"cap: the ratio search left every group unpruned, so its profile cannot be scaled to "
                           f"target_{target.kind}={target.target:g}; raise tolerance")

    def scaled(s: float) -> dict[str, float]:
        return {k: min(max_ratio, s * r) for k, r in ratios.items() if r > 0}

    def kept(s: float) -> float:
        small = pk.prune(model, example_inputs, config=PruneConfig(ratio=0.0, ratios=scaled(s)), graph=graph,
                         criterion=lambda m, g, **c: scores[g.index])
        return target.measure(small) / target.base

    lo, hi = 0.0, max_ratio / min(r for r in ratios.values() if r > 0)  # hi: every pruned group at max_ratio
    smallest = kept(hi)
    if smallest > target.target:
        raise PruningError(f"cap: target_{target.kind}={target.target:g} cannot be met by scaling the searched "
                           f"ratios; at max_ratio={max_ratio:g} the model keeps {smallest:.4f}")
    while hi - lo > 1e-4 * hi:  # one channel of a group moves s by >= 1 / (r * size), far coarser
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if kept(mid) <= target.target else (mid, hi)
    return scaled(hi), hi


@register("cap")
def cap(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None, batches: int = 8,
        evaluate: Callable[[nn.Module], float] | None = None, tolerance: float = 0.02, max_ratio: float = 0.9,
        search_steps: int = 4, seed: int = 0, **kwargs: Any) -> MethodResult:
    """Compensation-aware pruning with closed-form compensation (no fine-tuning). With
    ``evaluate`` (model -> accuracy), per-group ratios come from the bottom-up search, scaled
    to the budget in ``kwargs`` when one is given (:func:`scale_to_budget`); otherwise the
    budget in ``kwargs`` applies (see :func:`prunekit.methods.budget_config`). Returns the
    compensated model and its plan; ``info`` has the searched (and scaled) ratios."""
    cfg = budget_config(kwargs, "cap")
    calib = take_batches(loader, batches, "cap")
    graph = pk.trace(model, example_inputs, ignore=cfg.ignore)
    budget = cfg.replace(ignore=None)  # ignored modules are in the graph now
    scores = criteria.score_groups(model, graph.groups, "cap", loader=calib, batches=len(calib), seed=seed)
    info: dict[str, Any] = {"criterion": "cap"}
    if evaluate is not None:
        ratios, trials = search_ratios(model, example_inputs, calib, evaluate, graph=graph, scores=scores,
                                       tolerance=tolerance, max_ratio=max_ratio, steps=search_steps, seed=seed)
        info.update(searched_ratios=ratios, trials=trials)
        if budget.target is not None:
            ratios, info["profile_scale"] = scale_to_budget(model, example_inputs, ratios, budget, graph=graph,
                                                            scores=scores, max_ratio=max_ratio)
            info["scaled_ratios"] = ratios
        budget = PruneConfig(ratio=0.0, ratios=ratios)
    small, plan = compensated(model, example_inputs, calib, graph=graph, scores=scores, config=budget, seed=seed)
    return MethodResult(small, plan, info)
