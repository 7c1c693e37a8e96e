"""``round_to="auto"``: the channel multiple chosen by timing, never making the model slower.

Odd channel counts can make a pruned model *slower* than the original (vectorised kernels pad
them, ONNX Runtime and oneDNN fall back to other kernels); rounding every kept width to a
multiple of 8 or 16 avoids that where the backend wants it, and costs accuracy (channels kept
or removed past the budget) where it does not. So for one prune:

1. for every candidate multiple ``m`` in :data:`CANDIDATES` (1, 4, 8, 16, 32) the allocation is
   solved again with ``round_to=m`` (a budget's bisection or knapsack re-run, so FLOPs / params
   targets still hold; a ratio prune rounds its kept counts up), and the result's exact widths
   are looked up in a :class:`~prunekit.measure.width_table.WidthTable` (timed on the model's
   device and backend when first asked for, cached by layer configuration);
2. a candidate whose estimated latency is above the original model's is refused;
3. the others are compared by their estimated latency *per unit kept of what the prune asks
   for* (``estimate / kept``: the budget's FLOPs, parameters or latency; the channels for a ratio
   prune), so a multiple is credited for running what it keeps faster, not for the channels its
   rounding removes past a budget (a budget's coarse multiple lands further below the target) or
   for keeping more than a ratio asks (a ratio rounds kept counts up, and a coarse multiple can
   keep whole layers); the smallest ``m`` within :data:`TIE` (2%) of the best score wins, as a
   finer multiple strays less from what was asked;
4. if every candidate is refused, ``m = 1`` is kept and the record's ``"warning"`` says that no
   rounding makes the model faster (:func:`prunekit.prune` issues it as a
   :class:`~prunekit.errors.PruningShortfallWarning`).

The choice is made before validation: groups kept whole by a later repair are not re-rounded.
The record (:func:`choose_round_to`'s second result) lands in ``plan.meta["round_to_auto"]``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch import nn

from prunekit.errors import PruningError

__all__ = ["CANDIDATES", "TIE", "choose_round_to"]

#: The multiples tried (4 matters on tiny nets, 8/16/32 for SIMD widths and tensor cores).
CANDIDATES: tuple[int, ...] = (1, 4, 8, 16, 32)
#: Scores within this fraction of the best count as equal; the smallest multiple among them wins.
TIE = 0.02


def choose_round_to(original: nn.Module, table: Any, allocate: Callable[[int], list[np.ndarray]],
                    build: Callable[[list[np.ndarray]], nn.Module],
                    kept: Callable[[list[np.ndarray], nn.Module], float], *, quantity: str,
                    candidates: tuple[int, ...] = CANDIDATES) -> tuple[int, dict[str, Any]]:
    """The multiple to round channel counts to, and the record of how it was chosen.

    ``allocate(m)`` is the removal (per group) with ``round_to=m`` (a :class:`PruningError`
    drops the candidate, e.g. a budget a coarse multiple cannot meet); ``build(removal)`` the
    pruned model it gives (only its widths are read); ``kept(removal, model)`` the fraction of
    ``quantity`` (``"flops"``, ``"params"``, ``"latency"`` or ``"channels"``) it keeps; ``table`` a
    :class:`~prunekit.measure.width_table.WidthTable` of ``original``. See the module docstring
    for the rule; the record holds the original's estimate and, per candidate, its estimated
    ms, fraction kept, score and whether it was refused (or the error that dropped it)."""
    base = float(table.estimate(original))
    rows: dict[str, dict[str, Any]] = {}
    scores: dict[int, float] = {}
    for m in candidates:
        try:
            removed = allocate(m)
        except PruningError as exc:
            rows[str(m)] = {"error": str(exc)}
            continue
        small = build(removed)
        est = float(table.estimate(small))
        frac = float(kept(removed, small))
        score = est / frac if frac > 0 else float("inf")
        refused = est > base * (1 + 1e-9)
        rows[str(m)] = {"estimated_ms": est, "vs_original": est / base if base > 0 else None, f"{quantity}_kept": frac,
                        "score": score, "channels_removed": int(sum(len(r) for r in removed)), "refused": refused}
        if not refused:
            scores[m] = score
    record: dict[str, Any] = {"backend": table.backend, "device": table.device, "original_ms": base,
                              "quantity": quantity, "rule": f"lowest estimated ms per {quantity} kept among candidates "
                              f"not slower than the original; smallest multiple within {TIE:.0%} of the best",
                              "candidates": rows}
    tried = [r for r in rows.values() if "estimated_ms" in r]
    if scores:
        best = min(scores.values())
        chosen = min(m for m, s in scores.items() if s <= best * (1 + TIE))
    elif not tried:
        chosen = 1  # no candidate could be allocated: round_to=1 raises the allocation's own error
    else:
        chosen = 1
        fastest = min(tried, key=lambda r: r["estimated_ms"])
        text = (f"round_to='auto': every candidate multiple ({', '.join(map(str, candidates))}) is estimated slower "
                f"than the original on {table.backend}/{table.device}"
                + (f" (the fastest, m={_m(rows, fastest)}, {fastest['vs_original']:.3g}x)"
                   if fastest.get("vs_original") else "")
                + "; keeping round_to=1")
        record["warning"] = text
    record["chosen"] = chosen
    return chosen, record


def _m(rows: dict[str, dict[str, Any]], row: dict[str, Any]) -> str:
    """The candidate multiple whose record is ``row``."""
    return next(k for k, r in rows.items() if r is row)
