"""Budgets over whole units: the greedy against the exact best subset, the prefix bisection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prunekit.allocate.units import budget_report, greedy_removal, smallest_prefix


def test_greedy_removal_against_every_subset() -> None:
    rng = np.random.default_rng(0)
    exact = worse = 0
    for _ in range(200):
        n = int(rng.integers(1, 7))
        saved = list(rng.dirichlet(np.ones(n + 1))[:n])  # the units' savings leave something kept
        order = list(rng.permutation(n))
        target = float(rng.uniform(0.05, 1.0))
        taken = greedy_removal(order, saved, target)
        kept = 1 - sum(saved[i] for i in taken)
        feasible = [1 - sum(saved[i] for i in s) for r in range(n + 1) for s in itertools.combinations(range(n), r)]
        reachable = [k for k in feasible if k <= target]
        if not reachable:
            assert sorted(taken) == list(range(n))  # cannot be met: everything goes
            continue
        best = max(reachable)
        assert kept <= target + 1e-12 and kept <= best + 1e-12
        assert all(target - kept < saved[i] for i in taken)  # putting any one back would break the target
        assert taken == [i for i in order if i in taken]  # reported in rank order
        if kept == pytest.approx(best):
            exact += 1
        else:
            worse += 1
    assert exact > worse > 0  # mostly the best subset, not always (that is a subset-sum problem)


def test_greedy_prefers_the_ranking_over_the_closest_subset() -> None:
    # Rank order takes 0 then 1 (kept 0.4); 0 goes back (0.5). The closest subset {0, 2} keeps 0.7.
    assert greedy_removal([0, 1, 2], [0.1, 0.5, 0.2], target=0.75) == [1]


@pytest.mark.parametrize("first", [0, 1, 4, 7, 8])
def test_smallest_prefix_is_the_first_fitting_count(first: int) -> None:
    calls: list[int] = []

    def fits(k: int) -> bool:
        calls.append(k)
        return k >= first

    assert smallest_prefix(fits, 8) == first
    assert len(calls) <= 5  # bisection: log2(9) + 1 evaluations
    assert smallest_prefix(lambda k: False, 8) is None


def test_budget_report() -> None:
    assert budget_report("flops", 0.5, 0.49) == {"kind": "flops", "target": 0.5, "kept": 0.49,
                                                  "gap": pytest.approx(0.01), "reached": True,
                                                  "within_tolerance": True}
    assert not budget_report("params", 0.5, 0.45)["within_tolerance"]
    assert not budget_report("params", 0.5, 0.51)["reached"]
