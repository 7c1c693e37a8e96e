"""Budgets met by removing whole units (layers, residual blocks) instead of channels.

A unit is removed as a piece, so a FLOPs/params target is met only as closely as the units
allow. Two rules, both keeping *at most* the target (as the channel budgets do):

* :func:`smallest_prefix` — units come in a fixed order (ResConv: smallest layer factor
  first) and the answer is how many to take: the fewest whose removal meets the target,
  found by bisection over a measured, monotone quantity.
* :func:`greedy_removal` — units ranked by importance, each saving a known fraction: take
  them in rank order until the target holds, then put back, most important first, every
  taken unit whose return still meets it. Afterwards the gap to the target is smaller than
  the saving of every unit still removed (else it would have been put back); the exact best
  subset (a subset-sum problem) can be closer.

>>> greedy_removal([0, 1, 2], [0.1, 0.5, 0.2], target=0.75)  # takes 0 and 1, puts 0 back
[1]
>>> smallest_prefix(lambda k: k >= 3, 5)
3
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prunekit.errors import PruningError

__all__ = ["TOLERANCE", "budget_report", "check_target_kind", "greedy_removal", "smallest_prefix"]

TOLERANCE = 0.02
"""How close (a fraction of the original) a unit budget should land below its target."""


def check_target_kind(target: tuple[str, float] | None, method: str) -> None:
    """Raise :class:`PruningError` for a latency target, which unit removal cannot plan with:
    the latency table interpolates channel widths of the layers it timed, and a removed layer
    has none."""
    if target is not None and target[0] == "latency":
        raise PruningError(f"method '{method}': target_latency is not supported (the latency table estimates "
                           "channel widths, not removed layers); use target_flops or target_params")


def smallest_prefix(fits: Callable[[int], bool], n: int) -> int | None:
    """The smallest ``k`` in ``[0, n]`` with ``fits(k)``, by bisection (``fits`` must be
    monotone: once true, true for every larger ``k``); None when even ``fits(n)`` is false."""
    if not fits(n):
        return None
    lo, hi = -1, n  # fits(hi) holds; fits(lo) does not (lo = -1 stands for "nothing fits")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def greedy_removal(order: Sequence[int], saved: Sequence[float], target: float) -> list[int]:
    """Units to remove (indices into ``saved``, in ``order``'s order) so that the kept
    fraction ``1 - sum(saved[i] for removed i)`` is at most ``target``: units in ``order``
    (least important first) until it holds, then each taken unit, most important first, put
    back while the target still holds. Every unit in ``order`` when the target cannot be met."""
    kept = 1.0
    taken: list[int] = []
    for i in order:
        if kept <= target:
            break
        taken.append(i)
        kept -= saved[i]
    if kept > target:
        return taken
    for i in reversed(list(taken)):
        if kept + saved[i] <= target:
            taken.remove(i)
            kept += saved[i]
    return taken


def budget_report(kind: str, target: float, kept: float) -> dict[str, Any]:
    """What a unit budget reached: ``kept`` against ``target`` (fractions of the original),
    ``gap = target - kept``, ``reached`` (kept at most the target) and ``within_tolerance``
    (reached and within :data:`TOLERANCE` of it)."""
    reached = kept <= target + 1e-9
    return {"kind": kind, "target": target, "kept": kept, "gap": target - kept, "reached": reached,
            "within_tolerance": reached and target - kept <= TOLERANCE}
