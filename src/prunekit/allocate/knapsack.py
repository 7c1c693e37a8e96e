"""Cost-aware allocation: remove the channels that buy the most of the budgeted quantity
(latency, FLOPs or parameters) per unit of importance lost.

A greedy solver of the knapsack that latency-aware structured pruning poses (HALP, Shen et al.
2022: keep the most importance under a latency budget read from a per-layer latency table).
Each group's channels go lowest score first (scores normalised by the group's mean, as the
global ranking does, or raw); a group's next chunk (the channels that take its kept count to
the next multiple of ``round_to`` below) costs the sum of its normalised scores and saves what
the differentiable cost model (:class:`prunekit.allocate.cost.CostModel`) says removing it
saves: its first-order saving, the gradient of the cost at the current mask summed over the
chunk (exact where the cost is linear in the group, e.g. a layer's FLOPs in its output
width; a latency table is piecewise bilinear). Each round takes the best chunks (least
importance per saving, one per group) until their savings cover a quarter of the remaining
gap, then re-linearises, so the steps shrink near the target; it stops at the first removal
whose cost is within the target.

Simplification of HALP: HALP solves the knapsack exactly (dynamic programming over neurons
sorted by importance, with each layer's latency given the previous layer's kept width of the
last iteration) and iterates with fine-tuning in between; here the knapsack is solved greedily
by value per cost, once, on the table's interpolated costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from prunekit.allocate import _lowest, check_round_to, tie_units
from prunekit.errors import PruningError
from prunekit.graph.dependency import ChannelGroup

__all__ = ["knapsack_removal"]


def _chunk(size: int, removed: int, round_to: int) -> int:
    """Channels the next step of a group removes: down to the next multiple of ``round_to``
    of the kept count (one channel without rounding)."""
    keep = size - removed
    nxt = (keep - 1) // round_to * round_to if round_to > 1 else keep - 1
    return keep - nxt


def _moves(groups: list[ChannelGroup], counts: list[int], round_to: int, tied: dict[int, tuple[int, ...]],
           units: dict[tuple[int, ...], list[int]]) -> list[list[tuple[int, int]]]:
    """The next steps on offer: (group, channels) for each untied group, and one unit of
    every group of a tie class together."""
    out, seen = [], set()
    for gi, g in enumerate(groups):
        tie = tied.get(gi)
        if tie is None:
            out.append([(gi, _chunk(g.size, counts[gi], round_to))])
        elif tie not in seen:
            seen.add(tie)
            out.append(list(zip(tie, units[tie])))
    return out


def knapsack_removal(groups: list[ChannelGroup], scores: list[np.ndarray], cost: object, kind: str, target: float,
                     *, raw: bool = False, round_to: int = 1, min_channels: int = 1,
                     max_group_ratio: float = 0.9, ties: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
    """Channels to remove (sorted local indices per group) so that ``cost.measure(kind, mask)``
    falls to at most ``target`` x its unpruned value, chosen greedily by importance lost per
    cost saved (see the module docstring). ``cost`` is a :class:`~prunekit.allocate.cost.CostModel`
    of ``groups``' graph; ``raw`` ranks the scores as they are instead of normalised by their
    group mean. The groups of a tie class (``ties``, see :func:`prunekit.allocate.tie_units`)
    step together, one unit each, ignoring ``round_to``. A target the largest removal allowed
    cannot meet raises :class:`PruningError`."""
    round_to = check_round_to(round_to)
    base = float(cost.base(kind))  # type: ignore[attr-defined]
    goal = target * base
    orders, norms, caps = [], [], []
    for g, s in zip(groups, scores):
        cand = np.flatnonzero(g.prunable)
        s = np.asarray(s, dtype=np.float64)
        norm = s if raw or not len(cand) else s / (np.mean(s[cand]) + 1e-12)
        orders.append(cand[np.argsort(norm[cand], kind="stable")])
        norms.append(norm)
        cap = min(g.n_prunable, g.size - min_channels, int(math.floor(max_group_ratio * g.size)))
        caps.append(max(cap, 0))
    counts = [0] * len(groups)
    tied = {i: tuple(t) for t in ties or () for i in t}
    units = {t: tie_units(groups, t, min_channels)[0] for t in set(tied.values())}
    offsets = cost.offsets  # type: ignore[attr-defined]  # the cost model's groups are these, in this order
    while True:
        mask = cost.mask_of([o[:n] for o, n in zip(orders, counts)]).requires_grad_(True)  # type: ignore[attr-defined]
        value = cost.measure(kind, mask)  # type: ignore[attr-defined]
        if float(value.detach()) <= goal * (1 + 1e-12):
            break
        (grad,) = torch.autograd.grad(value, mask)
        grad = grad.numpy()
        options = []
        for moves in _moves(groups, counts, round_to, tied, units):
            if any(counts[gi] + step > caps[gi] for gi, step in moves):
                continue
            chunks = [(gi, orders[gi][counts[gi]:counts[gi] + step]) for gi, step in moves]
            saved = float(sum(grad[offsets[gi] + chunk].sum() for gi, chunk in chunks))
            if saved <= 0:
                continue  # removing it would not lower the cost
            options.append((float(sum(norms[gi][chunk].sum() for gi, chunk in chunks)) / saved, saved, moves))
        if not options:
            raise PruningError(f"target_{kind}={target:g} cannot be met; the smallest model keeps "
                               f"{100 * float(value.detach()) / base:.2f}% of the {kind}")
        options.sort(key=lambda o: (o[0], o[1]))
        gap, covered = float(value.detach()) - goal, 0.0
        for _, saved, moves in options:
            for gi, step in moves:
                counts[gi] += step
            covered += saved
            if covered >= gap / 4:
                break
    # The same prefixes, unless a producing layer would fall below min_channels (then _lowest walks on).
    return [_lowest(g, norms[gi], n, min_channels) for gi, (g, n) in enumerate(zip(groups, counts))]
