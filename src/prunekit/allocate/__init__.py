"""How many channels to remove from each group, and which (lowest scores first)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from prunekit.errors import PruningError
from prunekit.graph.dependency import ChannelGroup


def check_ratio(value: float, option: str) -> float:
    """Validate a pruning ratio (fraction removed) in [0, 1); returns it as float."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise PruningError(f"{option}={value!r}: must be a number in [0, 1)") from None
    if not 0.0 <= r < 1.0 or math.isnan(r):
        raise PruningError(f"{option}={value!r}: must be in [0, 1) (the fraction of channels removed)")
    return r


def group_ratio(group: ChannelGroup, ratio: float, ratios: Mapping[str, float] | None) -> float:
    """Ratio for ``group``: the most specific entry of ``ratios`` naming one of its
    producing modules (or a parent of one), else ``ratio``."""
    if not ratios:
        return ratio
    producers = [m.tensor.rpartition(".")[0] for m in group.members if m.role == "out"]
    best, best_len = ratio, -1
    for key, r in ratios.items():
        for p in producers:
            if (p == key or p.startswith(key + ".") or key == "") and len(key) > best_len:
                best, best_len = r, len(key)
    return best


def resolve_group_ratios(groups: list[ChannelGroup], group_ratios: Mapping[str | int, float] | None
                         ) -> dict[int, float] | None:
    """``group_ratios`` (keys: group names as :func:`prunekit.trace` prints them, or indices
    into ``groups``) keyed by group index; None when empty. An unknown index or name, or a
    name that several groups share, raises :class:`PruningError` naming it."""
    if not group_ratios:
        return None
    by_name: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_name.setdefault(g.name, []).append(i)
    out: dict[int, float] = {}
    for key, r in group_ratios.items():
        if isinstance(key, str):
            hits = by_name.get(key, [])
            if not hits:
                shown = ", ".join(repr(n) for n in list(by_name)[:6])
                raise PruningError(f"group_ratios: no group named {key!r} (groups: {shown}"
                                   f"{', ...' if len(by_name) > 6 else ''})")
            if len(hits) > 1:
                raise PruningError(f"group_ratios: {len(hits)} groups are named {key!r}; give their indices "
                                   f"({', '.join(map(str, hits))}) instead")
            index = hits[0]
        else:
            index = int(key)
            if not 0 <= index < len(groups):
                raise PruningError(f"group_ratios: group index {index} out of range (the model has {len(groups)} groups)")
        out[index] = float(r)
    return out


def check_round_to(round_to: object) -> int:
    """``round_to`` as an int >= 1, else :class:`PruningError`: an allocator rounds to a given
    multiple; ``round_to="auto"`` is resolved to one by :func:`prunekit.prune` (by timing,
    :mod:`prunekit.allocate.rounding`) before any allocator runs."""
    if round_to == "auto":
        raise PruningError("round_to='auto': this allocation takes an integer multiple; 'auto' is chosen by "
                           "timing in prunekit.prune (methods that allocate channels themselves need an integer)")
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise PruningError(f"round_to={round_to!r}: must be an integer >= 1")
    return int(round_to)


def _round_keep(size: int, n_remove: int, round_to: int, n_prunable: int, min_channels: int) -> int:
    n_remove = min(n_remove, n_prunable, max(size - min_channels, 0))
    if round_to > 1:
        keep = size - n_remove
        keep = min(size, int(math.ceil(keep / round_to)) * round_to)
        n_remove = max(size - keep, 0)
    return max(n_remove, 0)


def _lowest(group: ChannelGroup, scores: np.ndarray, n: int, min_channels: int) -> np.ndarray:
    """The ``n`` lowest-scored prunable channels, never emptying a producing layer below
    ``min_channels`` (a group can join layers of very different widths)."""
    cand = np.flatnonzero(group.prunable)
    order = cand[np.argsort(scores[cand], kind="stable")]
    if not group.producers:
        return np.sort(order[:n])
    first = order[:n]
    if all(len(p) - np.isin(p, first).sum() >= min_channels for p in group.producers):
        return np.sort(first)  # the common case: no producing layer runs short, no need to walk
    remaining = [len(p) for p in group.producers]
    owners: dict[int, list[int]] = {}
    for pi, chans in enumerate(group.producers):
        for c in chans.tolist():
            owners.setdefault(c, []).append(pi)
    chosen: list[int] = []
    for c in order.tolist():
        if len(chosen) == n:
            break
        if any(remaining[p] <= min_channels for p in owners.get(c, ())):
            continue
        chosen.append(c)
        for p in owners.get(c, ()):
            remaining[p] -= 1
    return np.sort(np.array(chosen, dtype=np.int64))


def tie_units(groups: list[ChannelGroup], tie: Sequence[int], min_channels: int) -> tuple[list[int], int, int]:
    """The steps of one tie class (groups keeping the same fraction of their channels,
    :attr:`prunekit.graph.DependencyGraph.ties`): every group keeps ``m * unit`` channels,
    ``unit = size / gcd(sizes)``; returns (units, smallest m allowed, largest m = gcd). The
    smallest m keeps every group's unprunable channels and ``min_channels``."""
    sizes = [groups[i].size for i in tie]
    top = math.gcd(*sizes)
    units = [s // top for s in sizes]
    low = 1
    for i, u in zip(tie, units):
        g = groups[i]
        need = max(g.size - g.n_prunable, min(min_channels, g.size))
        low = max(low, -(-need // u))
    return units, min(low, top), top


def tie_removal(groups: list[ChannelGroup], counts: list[int], ties: Sequence[Sequence[int]] | None,
                min_channels: int = 1, round_to: int = 1) -> list[int]:
    """``counts`` (channels to remove per group) with every tie class moved to one common
    fraction kept: the step nearest the class's overall kept fraction (a tie between two
    steps keeps more), preferring steps where every count is a multiple of ``round_to``."""
    out = list(counts)
    for tie in ties or ():
        units, low, top = tie_units(groups, tie, min_channels)
        kept = sum(groups[i].size - counts[i] for i in tie)
        want = top * kept / sum(groups[i].size for i in tie)
        steps = list(range(low, top + 1))
        if round_to > 1:
            rounded = [m for m in steps if all(m * u % round_to == 0 or m == top for u in units)]
            steps = rounded or steps
        m = min(steps, key=lambda k: (abs(k - want), -k))
        for i, u in zip(tie, units):
            out[i] = groups[i].size - m * u
    return out


def select(groups: list[ChannelGroup], scores: list[np.ndarray], *, ratio: float,
           ratios: Mapping[str, float] | None = None, global_ranking: bool | str = False, round_to: int = 1,
           min_channels: int = 1, max_group_ratio: float = 0.9,
           group_ratios: Mapping[int, float] | None = None,
           ties: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
    """Pick the channels to remove, per group (sorted local indices).

    * uniform (default): ``floor(ratio * size)`` lowest-scored prunable channels of every group
      (``ratios`` overrides the ratio for groups produced by the named modules, and
      ``group_ratios``, keyed by position in ``groups``, for single groups, over both);
    * ``global_ranking``: scores are divided by their group mean and ranked across groups;
      ``ratio`` of all channels go, no group losing more than ``max_group_ratio``;
    * ``global_ranking="raw"``: the same on the scores as they are, for scores already on one
      scale across groups (learned gates, log-odds, BN scales: a global threshold).
    ``round_to`` keeps channel counts multiples of it; every group keeps ``min_channels``.
    Groups in one of ``ties`` keep one common fraction of their channels (:func:`tie_removal`).
    """
    round_to = check_round_to(round_to)
    if min_channels < 1:
        raise PruningError(f"min_channels={min_channels}: must be >= 1 (a group cannot lose all its channels)")
    if group_ratios and global_ranking:
        raise PruningError("group_ratios: per-group ratios and global_ranking exclude each other")
    if not global_ranking:
        counts = []
        for i, g in enumerate(groups):
            r = group_ratios[i] if group_ratios and i in group_ratios else group_ratio(g, ratio, ratios)
            counts.append(_round_keep(g.size, int(math.floor(r * g.size + 1e-9)), round_to, g.n_prunable,
                                      min_channels))
        counts = tie_removal(groups, counts, ties, min_channels, round_to)
        return [_lowest(g, s, n, min_channels) for g, s, n in zip(groups, scores, counts)]
    entries = []
    for gi, (g, s) in enumerate(zip(groups, scores)):
        if g.n_prunable == 0:
            continue
        norm = s if global_ranking == "raw" else s / (np.mean(s[g.prunable]) + 1e-12)
        for c in np.flatnonzero(g.prunable):
            entries.append((norm[c], gi, c))
    entries.sort()
    target = int(math.floor(ratio * sum(g.size for g in groups)))
    counts = [0] * len(groups)
    caps = [min(g.n_prunable, g.size - min_channels, int(math.floor(max_group_ratio * g.size))) for g in groups]
    taken = 0
    for _, gi, _c in entries:
        if taken >= target:
            break
        if counts[gi] < caps[gi]:
            counts[gi] += 1
            taken += 1
    counts = [_round_keep(g.size, counts[i], round_to, g.n_prunable, min_channels) for i, g in enumerate(groups)]
    counts = tie_removal(groups, counts, ties, min_channels, round_to)
    return [_lowest(g, s, n, min_channels) for g, s, n in zip(groups, scores, counts)]
