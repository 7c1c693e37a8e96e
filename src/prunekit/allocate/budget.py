"""Budgets: keep at most a fraction of FLOPs, parameters or estimated latency, and the
solver that picks which channels go to meet one, as closely as one channel allows."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from torch import nn

from prunekit.allocate import select
from prunekit.errors import PruningError
from prunekit.measure import count_params
from prunekit.measure.counts import count_flops_meta_first

if TYPE_CHECKING:
    from prunekit.config import PruneConfig

__all__ = ["Budget", "make_budget", "removal_for_budget"]

_QUANTITY = {"flops": "FLOPs", "params": "parameters", "latency": "estimated latency"}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a target constrains: ``measure(model)`` of the pruned model over ``base`` must be
    at most ``target`` (a fraction kept); ``table`` is the latency table of a latency budget."""

    kind: str
    target: float
    base: float
    measure: Callable[[nn.Module], float]
    table: Any = None


def make_budget(model: nn.Module, example_inputs: Any, config: PruneConfig) -> Budget | None:
    """The budget ``config`` asks for (None when pruning by ratio); its values were checked
    when the config was made. A latency budget times a per-layer table on the model's
    device unless ``config.latency_table`` is given."""
    if config.target is None:
        return None
    kind, target = config.target
    table = None
    if kind == "flops":
        measure: Callable[[nn.Module], float] = lambda m: float(count_flops_meta_first(m, example_inputs))  # noqa: E731
    elif kind == "params":
        measure = lambda m: float(count_params(m))  # noqa: E731
    else:
        table = config.latency_table
        if table is None:
            from prunekit.measure.latency_table import build_latency_table

            table = build_latency_table(model, example_inputs)
        measure = table.estimate
    return Budget(kind, target, measure(model), measure, table)


def removal_for_budget(groups: list[Any], scores: list[np.ndarray], budget: Budget, options: dict[str, Any],
                       value: Callable[[list[np.ndarray]], float]) -> list[np.ndarray]:
    """Channels to remove (local indices per group) so that ``value(removal)``, the fraction
    of the budgeted quantity kept, is at most ``budget.target``, as close to it as one
    channel allows; ``options`` are :func:`select`'s. A target that even the largest ratio
    cannot meet raises :class:`PruningError` with the smallest fraction reachable.

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
        raise PruningError(f"target_{budget.kind}={budget.target:g} cannot be met; the smallest model keeps "
                           f"{100 * value(under):.2f}% of the {_QUANTITY[budget.kind]}")
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
