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
    next step, in group order (a tie class steps as one). A tie class moves in coarse steps
    (a ViT's heads and embedding: a third of the width at a time), so the same search is run
    again with the classes held at the step below the one taken, the other groups making up
    the rest; the closer result wins."""

    def fits(removed: list[np.ndarray]) -> bool:
        try:
            return value(removed) <= budget.target
        except Exception:  # noqa: BLE001 - a broken candidate is sorted out by validation
            return True

    def choose(ratio: float) -> list[np.ndarray]:
        return select(groups, scores, ratio=ratio, **options)

    best, over = _bisect(choose, fits, len(groups), options.get("ties"))
    if best is None:
        raise PruningError(f"target_{budget.kind}={budget.target:g} cannot be met; the smallest model keeps "
                           f"{100 * value(choose(0.99)):.2f}% of the {_QUANTITY[budget.kind]}")
    held = {i for t in options.get("ties") or () for i in t}
    if held:
        def holding(ratio: float) -> list[np.ndarray]:
            return [over[i] if i in held else r for i, r in enumerate(choose(ratio))]

        other, _ = _bisect(holding, fits, len(groups), None)
        if other is not None and value(other) > value(best):
            best = other
    return best


def _bisect(choose: Callable[[float], list[np.ndarray]], fits: Callable[[list[np.ndarray]], bool], n: int,
            ties: Any) -> tuple[list[np.ndarray] | None, list[np.ndarray]]:
    """The fitting removal :func:`removal_for_budget` describes, among ``choose(ratio)``'s, and
    the removal at the largest ratio that does not fit; (None, ...) when no ratio fits."""
    lo, hi = 0.0, 0.99
    for _ in range(16):
        mid = (lo + hi) / 2
        if fits(choose(mid)):
            hi = mid
        else:
            lo = mid
    under, over = choose(hi), choose(lo)
    if not fits(under):
        return None, over
    # A step is a group, or a whole tie class (its groups keep one fraction: they move together).
    unit_of = {i: tuple(t) for t in ties or () for i in t}
    steps = list(dict.fromkeys(unit_of.get(i, (i,)) for i, (a, b) in enumerate(zip(under, over))
                               if len(a) != len(b) or not np.array_equal(a, b)))

    def mixed(k: int) -> list[np.ndarray]:
        take = {i for step in steps[:k] for i in step}
        return [under[i] if i in take else over[i] for i in range(n)]

    a, b = 0, len(steps)  # mixed(b) fits
    while b - a > 1:
        k = (a + b) // 2
        if fits(mixed(k)):
            b = k
        else:
            a = k
    return mixed(b), over
