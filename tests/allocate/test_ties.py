"""Tie classes (groups keeping one fraction of their channels) against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prunekit.allocate import select, tie_removal
from prunekit.graph.dependency import ChannelGroup


def _group(index: int, size: int, blocked: int = 0) -> ChannelGroup:
    prunable = np.ones(size, dtype=bool)
    prunable[:blocked] = False
    return ChannelGroup(index, f"g{index}", np.arange(size), prunable, ("",) * size, ())


def _brute(groups: list[ChannelGroup], counts: list[int], tie: tuple[int, ...], min_channels: int) -> set[tuple[int, ...]]:
    """Every kept-count tuple of the tie class with one common fraction, within the limits,
    nearest the class's overall kept fraction (the larger on a draw)."""
    sizes = [groups[i].size for i in tie]
    want = sum(s - counts[i] for i, s in zip(tie, sizes)) / sum(sizes)
    best: list[tuple[float, tuple[int, ...]]] = []
    for kept in itertools.product(*[range(s + 1) for s in sizes]):
        if any(k * sizes[0] != kept[0] * s for k, s in zip(kept, sizes)):
            continue
        if any(k < max(groups[i].size - groups[i].n_prunable, min(min_channels, groups[i].size))
               for k, i in zip(kept, tie)):
            continue
        f = kept[0] / sizes[0]
        best.append((abs(f - want), -f, kept))
    best.sort()
    top = best[0][:2]
    return {b[2] for b in best if b[:2] == top}


@pytest.mark.parametrize("seed", range(6))
def test_tie_removal_picks_the_nearest_common_fraction(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [int(rng.choice([2, 3, 4, 6, 8, 12])) for _ in range(3)]
    groups = [_group(i, s, blocked=int(rng.integers(0, 2))) for i, s in enumerate(sizes)]
    counts = [int(rng.integers(0, s)) for s in sizes]
    out = tie_removal(groups, counts, [(0, 2)], min_channels=1)
    assert out[1] == counts[1]  # untied: unchanged
    kept = (sizes[0] - out[0], sizes[2] - out[2])
    assert kept in _brute(groups, counts, (0, 2), 1)


def test_select_keeps_tied_groups_at_one_fraction_and_the_lowest_scores_go() -> None:
    groups = [_group(0, 12), _group(1, 3), _group(2, 10)]
    scores = [np.arange(12.0)[::-1].copy(), np.array([5.0, 1.0, 3.0]), np.arange(10.0)]
    removed = select(groups, scores, ratio=0.5, ties=[(0, 1)])
    assert [len(r) for r in removed] == [4, 1, 5]  # 12 and 3 keep 2/3: the step nearest their 8/15
    assert removed[0].tolist() == [8, 9, 10, 11] and removed[1].tolist() == [1]
