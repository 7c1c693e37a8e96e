"""Budgets: keep at most a fraction of FLOPs, parameters or estimated latency, and the
solver that picks which channels go to meet one, as closely as one channel allows."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from torch import nn

from prunekit.allocate import select
from prunekit.errors import PruningError
from prunekit.measure import count_flops, count_params

__all__ = ["Budget", "make_budget", "removal_for_budget"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a target constrains: ``measure(model)`` of the pruned model over ``base`` must be
    at most ``target`` (a fraction kept); ``table`` is the latency table of a latency budget."""

    kind: str
    target: float
    base: float
    measure: Callable[[nn.Module], float]
    table: Any = None


def _flops(model: nn.Module, example_inputs: Any) -> int:
    try:
        return count_flops(model, example_inputs, meta=True)
    except Exception:  # noqa: BLE001 - the meta device cannot run every model
        return count_flops(model, example_inputs)


def make_budget(model: nn.Module, example_inputs: Any, *, target_flops: float | None = None,
                target_params: float | None = None, target_latency: float | None = None,
                latency_table: Any = None) -> Budget | None:
    """The budget the options ask for (None when none is given); PruningError names an
    option that is out of range or given together with another. A latency budget times a
    per-layer table on the model's device unless ``latency_table`` is given."""
    given = {k: v for k, v in (("flops", target_flops), ("params", target_params), ("latency", target_latency))
             if v is not None}
    if not given:
        if latency_table is not None:
            raise PruningError("latency_table: only used with target_latency")
        return None
    if len(given) > 1:
        raise PruningError(f"give one budget, not {', '.join('target_' + k for k in given)}")
    kind, target = next(iter(given.items()))
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise PruningError(f"target_{kind}={target!r}: must be a number in (0, 1]") from None
    if not 0.0 < target <= 1.0:
        raise PruningError(f"target_{kind}={target!r}: must be in (0, 1] (the fraction of {kind} kept)")
    table = None
    if kind == "flops":
        measure: Callable[[nn.Module], float] = lambda m: float(_flops(m, example_inputs))  # noqa: E731
    elif kind == "params":
        measure = lambda m: float(count_params(m))  # noqa: E731
    else:
        if latency_table is None:
            from prunekit.measure.latency_table import build_latency_table

            latency_table = build_latency_table(model, example_inputs)
        table = latency_table
        measure = latency_table.estimate
    return Budget(kind, target, measure(model), measure, table)


def removal_for_budget(groups: list[Any], scores: list[np.ndarray], budget: Budget, options: dict[str, Any],
                       value: Callable[[list[np.ndarray]], float]) -> list[np.ndarray]:
    """Channels to remove (local indices per group) so that ``value(removal)``, the fraction
    of the budgeted quantity kept, is at most ``budget.target``, as close to it as one
    channel allows; ``options`` are :func:`select`'s.

    First bisect the ratio; a uniform ratio moves every group at once (ResNet-20's 16/32/64
    groups all step at multiples of 1/16), so then bisect over how many groups take the
    next step, in group order."""

    def fits(removed: list[np.ndarray]) -> bool:
        try:
            return value(removed) <= budget.target
        except Exception:  # noqa: BLE001 - a broken candidate is sorted out by validation
            return True

    lo, hi = 0.0, 0.99
    for _ in range(16):
        mid = (lo + hi) / 2
        if fits(select(groups, scores, ratio=mid, **options)):
            hi = mid
        else:
            lo = mid
    under, over = select(groups, scores, ratio=hi, **options), select(groups, scores, ratio=lo, **options)
    if not fits(under):
        return under  # even the largest ratio cannot meet the budget: prune as much as allowed
    steps = [i for i, (a, b) in enumerate(zip(under, over)) if len(a) != len(b) or not np.array_equal(a, b)]

    def mixed(k: int) -> list[np.ndarray]:
        take = set(steps[:k])
        return [under[i] if i in take else over[i] for i in range(len(groups))]

    a, b = 0, len(steps)  # mixed(b) fits
    while b - a > 1:
        k = (a + b) // 2
        if fits(mixed(k)):
            b = k
        else:
            a = k
    return mixed(b)
