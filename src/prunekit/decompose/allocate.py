"""Rank allocation under a FLOPs or parameter budget.

Two allocators, both over the layers' costs of :class:`~prunekit.decompose.layers.RankLayer`:

* :func:`greedy_ranks` — a greedy knapsack on cost saved against approximation error. Every
  layer starts as it is; a move takes one layer to its next smaller rank on its grid
  (multiples of ``round_to``; the first move factorises it at the largest rank that costs
  less than the unfactorised layer). The move with the smallest error increase per unit of
  cost saved is taken, until the model's cost is at or under the budget. Each move saves at
  most one rank step of one layer, so the result lands just under the budget. With the
  default error (the fraction of the weight's energy discarded, ``sum_{i>r} s_i^2 / sum s_i^2``),
  the increments ``s_r^2`` grow as the rank falls, so the marginal ratios are taken in order.
* :func:`aimet_ranks` — AIMET's greedy selection from a per-layer sensitivity table: for an
  error level ``L``, every layer takes the smallest measured rank whose error is at most
  ``L`` (or stays as it is); the smallest level that meets the budget is found by bisection
  over the measured errors. Its ranks are the table's candidates, so it lands on the budget
  only as closely as the candidates allow.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from prunekit.decompose.layers import RankLayer
from prunekit.errors import PruningError

__all__ = ["rank_grid", "greedy_ranks", "aimet_ranks"]

ErrorFn = Callable[[RankLayer, int], float]


def rank_grid(layer: RankLayer, round_to: int, what: str) -> list[int]:
    """The ranks a budget may give ``layer``: multiples of ``round_to`` (its full rank where
    that is not one) that cost less than the layer as it is, ascending."""
    ranks = list(range(round_to, layer.full_rank + 1, round_to))
    if not ranks or ranks[-1] != layer.full_rank:
        ranks.append(layer.full_rank)
    return [r for r in ranks if layer.profitable(r, what)]


def _unreachable(what: str, budget: float, best: float, total: float) -> PruningError:
    return PruningError(f"target_{what}={budget / total:.4g}: factorising every eligible layer at its smallest "
                        f"rank still leaves {best / total:.4g} of the model's {what}")


def greedy_ranks(layers: Sequence[RankLayer], what: str, total: int, budget: float, error: ErrorFn,
                 round_to: int = 1, tolerance: float = 0.02) -> dict[str, int]:
    """Ranks (layer name -> rank; absent: left as it is) that bring the model's cost ``total``
    (its FLOPs or parameters, ``what``) to at most ``budget`` by the greedy knapsack of the
    module docstring. ``error(layer, rank)`` is the approximation error of one layer at a rank
    (0 unfactorised). Raises PruningError when no allocation reaches the budget.

    The last move may overshoot by one rank step of one layer, which on a small model can be
    several percent of its cost. So the run is refined once: for every layer that moved, its
    last move is undone, the layer frozen, and the greedy continued with the others. Of the
    allocations at or under the budget, those within ``tolerance`` (relative) of it are
    preferred, and among them the one with the smallest summed error (otherwise the one
    closest to the budget)."""
    by_name = {layer.name: layer for layer in layers}
    grids = {layer.name: rank_grid(layer, round_to, what) for layer in layers}

    def rank_at(name: str, i: int) -> int | None:
        return None if i == len(grids[name]) else grids[name][i]

    def run(state: dict[str, int], cost: float, frozen: str | None) -> tuple[dict[str, int], float]:
        state = dict(state)  # name -> index into its grid; len(grid) (or absent): unfactorised
        heap: list[tuple[float, int, str]] = []
        order = {layer.name: k for k, layer in enumerate(layers)}

        def push(name: str) -> None:
            layer, i = by_name[name], state.get(name, len(grids[name]))
            if i == 0 or name == frozen:
                return
            now, nxt = rank_at(name, i), grids[name][i - 1]
            saved = layer.cost(what, now) - layer.cost(what, nxt)
            worse = error(layer, nxt) - (0.0 if now is None else error(layer, now))
            # Equal ratios: first come first served, layers in execution order.
            heapq.heappush(heap, (max(worse, 0.0) / saved, order[name], name))

        for layer in layers:
            if grids[layer.name]:
                push(layer.name)
        while cost > budget and heap:
            _, _, name = heapq.heappop(heap)
            i = state.get(name, len(grids[name]))
            cost -= by_name[name].cost(what, rank_at(name, i)) - by_name[name].cost(what, grids[name][i - 1])
            state[name] = i - 1
            push(name)
        return state, cost

    first, cost = run({}, float(total), None)
    if cost > budget:
        raise _unreachable(what, budget, cost, total)
    found = [(first, cost)]
    for name, i in first.items():
        undone = {**first, name: i + 1}
        back = by_name[name].cost(what, rank_at(name, i + 1)) - by_name[name].cost(what, grids[name][i])
        state, c = run(undone, cost + back, name)
        if c <= budget:
            found.append((state, c))

    def summed_error(state: dict[str, int]) -> float:
        return sum(error(by_name[n], grids[n][i]) for n, i in state.items() if i < len(grids[n]))

    near = [(summed_error(s), -c, k) for k, (s, c) in enumerate(found) if c >= (1 - tolerance) * budget]
    best = min(near)[2] if near else max(range(len(found)), key=lambda k: found[k][1])
    return {n: grids[n][i] for n, i in found[best][0].items() if i < len(grids[n])}


def aimet_ranks(layers: Sequence[RankLayer], what: str, total: int, budget: float,
                candidates: dict[str, list[tuple[int, float]]]) -> dict[str, int]:
    """AIMET's greedy per-layer selection: ``candidates[name]`` lists ``(rank, error)`` measured
    for a layer; the smallest error level at which taking, per layer, the smallest profitable
    measured rank with error at most the level brings the model's cost to ``budget`` or below.
    Returns layer name -> rank (absent: left as it is); PruningError when no level does."""
    options = {layer.name: sorted((r, e) for r, e in candidates.get(layer.name, []) if layer.profitable(r, what))
               for layer in layers}

    def pick(level: float) -> tuple[dict[str, int], float]:
        ranks, cost = {}, float(total)
        for layer in layers:
            ok = [r for r, e in options[layer.name] if e <= level]
            if ok:
                ranks[layer.name] = ok[0]
                cost -= layer.cost(what, None) - layer.cost(what, ok[0])
        return ranks, cost

    levels = sorted({e for opts in options.values() for _, e in opts})
    if not levels or pick(levels[-1])[1] > budget:
        raise _unreachable(what, budget, pick(levels[-1])[1] if levels else total, total)
    lo, hi = 0, len(levels) - 1  # the cost falls as the level rises: find the first level that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if pick(levels[mid])[1] <= budget:
            hi = mid
        else:
            lo = mid + 1
    return pick(levels[lo])[0]
