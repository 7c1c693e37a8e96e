"""Allocation: counts per group, rounding, global ranking."""

from __future__ import annotations

import numpy as np
import pytest

from prunekit.allocate import check_ratio, select
from prunekit.errors import PruningError
from prunekit.graph.dependency import ChannelGroup, GroupMember


def group(i: int, size: int, blocked: int = 0) -> ChannelGroup:
    prunable = np.ones(size, dtype=bool)
    prunable[:blocked] = False
    m = GroupMember(f"m{i}.weight", 0, "out", np.arange(size))
    return ChannelGroup(i, f"m{i}", np.arange(size) + 100 * i, prunable, tuple("" if p else "x" for p in prunable), (m,))


def test_uniform_removes_lowest_per_group() -> None:
    gs = [group(0, 10), group(1, 4)]
    scores = [np.arange(10.0)[::-1], np.array([5.0, 1.0, 3.0, 2.0])]
    out = select(gs, scores, ratio=0.5)
    assert out[0].tolist() == [5, 6, 7, 8, 9] and out[1].tolist() == [1, 3]


def test_blocked_channels_are_never_removed() -> None:
    gs = [group(0, 6, blocked=4)]
    out = select(gs, [np.zeros(6)], ratio=0.9)
    assert set(out[0].tolist()) <= {4, 5}


def test_round_to_and_min_channels() -> None:
    gs = [group(0, 16)]
    assert len(select(gs, [np.arange(16.0)], ratio=0.3, round_to=8)[0]) == 0  # 16-4=12 -> 16
    assert len(select(gs, [np.arange(16.0)], ratio=0.6, round_to=8)[0]) == 8  # 16-9=7 -> 8
    assert len(select(gs, [np.arange(16.0)], ratio=0.99, min_channels=5)[0]) == 11


def test_global_ranking_uses_normalised_scores() -> None:
    gs = [group(0, 4), group(1, 4)]
    # group 1 has 10x larger scores but the same relative spread: ranking must be fair
    scores = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 40.0])]
    out = select(gs, scores, ratio=0.25, global_ranking=True)
    assert out[0].tolist() == [0] and out[1].tolist() == [0]


@pytest.mark.parametrize("bad", [-1, 1, 2.5, "x", None])
def test_check_ratio_rejects(bad) -> None:
    with pytest.raises(PruningError, match="opt"):
        check_ratio(bad, "opt")


def test_raw_global_ranking_compares_the_scores_themselves() -> None:
    """Hand computation: raw scores 0.1, 0.2 (group 0) and 5, 0.3, 7, 6 (group 1). One channel
    to go: raw, 0.1 (group 0); normalised by the group means (0.15 and 3.075), group 1's 0.3
    (0.1 of its mean) goes before group 0's 0.1 (0.67). Three to go: 0.1, then 0.2 is refused
    (group 0 may lose at most 90% of 2 channels, i.e. 1), then 0.3 and 5."""
    gs = [group(0, 2), group(1, 4)]
    scores = [np.array([0.1, 0.2]), np.array([5.0, 0.3, 7.0, 6.0])]
    out = select(gs, scores, ratio=0.5, global_ranking="raw")
    assert out[0].tolist() == [0] and out[1].tolist() == [0, 1]
    normalised = select(gs, scores, ratio=0.5, global_ranking=True)
    assert normalised[1].tolist() == [0, 1] and normalised[0].tolist() == [0]
    assert select(gs, scores, ratio=1 / 6, global_ranking="raw")[0].tolist() == [0]
    assert select(gs, scores, ratio=1 / 6, global_ranking=True)[1].tolist() == [1]


def test_group_ratios_override_the_ratio_and_the_module_ratios() -> None:
    """Keyed by position in ``groups``: that group loses floor(r * size) of its lowest scores,
    over ``ratios`` naming its producer and over ``ratio``."""
    gs = [group(0, 10), group(1, 4), group(2, 8)]
    scores = [np.arange(10.0)[::-1], np.array([5.0, 1.0, 3.0, 2.0]), np.arange(8.0)]
    out = select(gs, scores, ratio=0.5, ratios={"m0": 0.1}, group_ratios={0: 0.3, 2: 0.0})
    assert out[0].tolist() == [7, 8, 9] and out[1].tolist() == [1, 3] and out[2].tolist() == []
    with pytest.raises(PruningError, match="group_ratios"):
        select(gs, scores, ratio=0.5, global_ranking=True, group_ratios={0: 0.3})


def test_prune_takes_group_ratios_by_name_or_index() -> None:
    """The same per-group ratios by traced group name and by index give the same model, with
    floor(r * size) channels gone from those groups only; bad keys are named."""
    import torch

    import prunekit as pk
    from nets import Residual

    m, x = Residual().eval(), torch.randn(1, 3, 16, 16)
    groups = pk.trace(m, x).groups
    named = {groups[1].name: 0.5, groups[0].name: 0.25}
    a = pk.prune(m, x, ratio=0.0, group_ratios=named)
    b = pk.prune(m, x, pk.PruneConfig(ratio=0.0, group_ratios={1: 0.5, 0: 0.25}))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.stem[0].out_channels == 16 - 4 and a.a[0][0].out_channels == 12 - 6 and a.b[0][0].out_channels == 12
    with pytest.raises(PruningError, match="no group named 'nope'"):
        pk.prune(m, x, ratio=0.0, group_ratios={"nope": 0.5})
    with pytest.raises(PruningError, match="group index 99 out of range"):
        pk.prune(m, x, ratio=0.0, group_ratios={99: 0.5})
    with pytest.raises(PruningError, match=r"group_ratios\[0\]"):
        pk.PruneConfig(group_ratios={0: 1.5})
    with pytest.raises(PruningError, match="exclude each other"):
        pk.PruneConfig(group_ratios={0: 0.5}, global_ranking=True)
    with pytest.raises(PruningError, match="knapsack"):
        pk.PruneConfig(group_ratios={0: 0.5}, target_flops=0.5, allocation="knapsack")
