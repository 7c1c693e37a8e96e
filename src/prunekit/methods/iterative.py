"""Iterative pruning: prune a little, recover, repeat (the schedule of most published results).

The budget is reached in ``steps`` equal steps (geometric in the fraction kept, so each step
removes the same share of what is left; or linear); between steps ``recover(model, step)``
(e.g. a short fine-tune) runs and may return a new model. Data-driven criteria are
re-scored on the current model at every step. The plans are composed into one plan relative
to the original architecture, so the result saves and loads like a one-shot result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from prunekit.errors import PruningError
from prunekit.graph import module_names
from prunekit.measure import count_flops, count_params
from prunekit.methods import MethodResult, budget_config, register
from prunekit.methods.criterion import prune_by_criterion
from prunekit.plan import PruningPlan, compose

log = logging.getLogger(__name__)


def schedule(final: float, steps: int, kind: str = "geometric") -> list[float]:
    """Fractions kept after each of ``steps`` steps, ending at ``final`` (geometric: equal
    shares of what is left; linear: equal shares of the original)."""
    if steps < 1:
        raise PruningError(f"steps={steps}: must be >= 1")
    if kind == "geometric":
        return [final ** ((k + 1) / steps) for k in range(steps)]
    if kind == "linear":
        return [1 - (1 - final) * (k + 1) / steps for k in range(steps)]
    raise PruningError(f"schedule={kind!r}: 'geometric' or 'linear'")


@register("iterative")
def prune_iteratively(model: nn.Module, example_inputs: Any, *, steps: int = 4, criterion: str = "l2",
                      recover: Callable[[nn.Module, int], nn.Module | None] | None = None,
                      loader: Iterable[Any] | None = None, batches: int = 8, kind: str = "geometric",
                      **kwargs: Any) -> MethodResult:
    """Reach the budget (``ratio``, ``target_flops`` or ``target_params``) in ``steps`` steps
    with ``recover`` in between (not after the last step). Returns the final model, the
    composed plan and the per-step fractions reached. The other options in ``kwargs`` (see
    :func:`prunekit.methods.budget_config`) apply to every step."""
    cfg = budget_config(kwargs, "iterative")
    if cfg.ignore:  # names stay valid in every pruned copy; module objects do not
        cfg = cfg.replace(ignore=module_names(model, list(cfg.ignore), "ignore"))
    if cfg.target_latency is not None:
        raise PruningError("iterative pruning takes ratio, target_flops or target_params (not target_latency)")
    target = cfg.target  # ("flops" | "params", fraction kept), or None for a ratio
    final = target[1] if target else 1.0 - cfg.ratio
    measure: Callable[[nn.Module], float] = (
        (lambda m: float(count_flops(m, example_inputs))) if target and target[0] == "flops" else
        (lambda m: float(count_params(m))) if target else (lambda m: 1.0))
    base = measure(model)
    current, plan, reached = model, PruningPlan(), []
    kept_channels = 1.0
    for step, goal in enumerate(schedule(final, steps, kind)):
        if target:
            now = measure(current) / base
            step_cfg = cfg.replace(**{f"target_{target[0]}": min(1.0, goal / now)})
        else:  # a ratio: remove the same share of what is left in every group
            step_cfg = cfg.replace(ratio=max(0.0, 1 - goal / kept_channels))
            kept_channels = goal
        result = prune_by_criterion(current, example_inputs, criterion=criterion, loader=loader, batches=batches,
                                    config=step_cfg)
        current = result.model
        plan = compose(plan, result.plan) if not plan.is_empty else result.plan
        reached.append(measure(current) / base if target else goal)
        log.info("step %d/%d: %.3f kept", step + 1, steps, reached[-1])
        if recover is not None and step < steps - 1:
            current = recover(current, step) or current
    return MethodResult(current, plan, {"criterion": criterion, "steps": steps, "reached": reached})
