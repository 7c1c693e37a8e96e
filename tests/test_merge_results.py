"""``benchmarks/merge_results.py``: shards' results merge without losing tuning values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_results.py"


def _merge():
    spec = importlib.util.spec_from_file_location("prunekit_merge_results", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.merge


def test_a_shard_with_an_older_grid_loses_no_tuning_value() -> None:
    """Shard A tuned data set "a" further (two new values, a new best) and ran nothing on "b";
    shard B tuned "b" further. Merged in either order, every value of both is kept, each data
    set's tuned LR comes from the shard that tuned it, and the runs of both are taken."""
    merge = _merge()
    old_a = {"1": {"val_top1": 0.5}}
    old_b = {"1": {"val_top1": 0.6}}
    shard_a = {"runs": {"a/x/0": {"status": "ok"}},
               "tuning_ucp": {"a": {**old_a, "2": {"val_top1": 0.7}, "3": {"val_top1": 0.4}}, "b": dict(old_b)},
               "config": {"ucp_lr": {"a": 2.0, "b": 1.0}}}
    shard_b = {"runs": {"b/x/0": {"status": "ok"}},
               "tuning_ucp": {"a": dict(old_a), "b": {**old_b, "4": {"val_top1": 0.9}}},
               "config": {"ucp_lr": {"a": 1.0, "b": 4.0}}}
    for first, second in ((shard_a, shard_b), (shard_b, shard_a)):
        into = {"tuning_ucp": {"a": dict(old_a), "b": dict(old_b)}, "config": {"ucp_lr": {"a": 1.0, "b": 1.0}}}
        assert merge(into, first) == 1 and merge(into, second) == 1
        assert sorted(into["tuning_ucp"]["a"]) == ["1", "2", "3"]
        assert sorted(into["tuning_ucp"]["b"]) == ["1", "4"]
        assert into["config"]["ucp_lr"] == {"a": 2.0, "b": 4.0}
        assert sorted(into["runs"]) == ["a/x/0", "b/x/0"]


def test_a_failed_shard_run_does_not_replace_a_finished_one() -> None:
    merge = _merge()
    into = {"runs": {"k": {"status": "ok", "top1": 0.9}}}
    assert merge(into, {"runs": {"k": {"status": "failed"}, "j": {"status": "failed"}}}) == 1
    assert into["runs"] == {"k": {"status": "ok", "top1": 0.9}, "j": {"status": "failed"}}


def test_a_stale_copy_does_not_replace_a_run_redone_later() -> None:
    """A clone carries the runs it was cloned with; when another shard redoes one, the later
    ``finished`` stamp wins whichever order the shards merge in, and a stamped run beats an
    unstamped (older) copy."""
    merge = _merge()
    stale = {"status": "ok", "top1": 0.5}
    redone = {"status": "ok", "top1": 0.6, "finished": "2026-12-02T14:00:00Z"}
    later = {"status": "ok", "top1": 0.7, "finished": "2026-12-02T15:00:00Z"}
    for shards in ([{"runs": {"k": redone}}, {"runs": {"k": stale}}], [{"runs": {"k": stale}}, {"runs": {"k": redone}}]):
        into = {"runs": {"k": dict(stale)}}
        for shard in shards:
            merge(into, shard)
        assert into["runs"]["k"] == redone
    into = {"runs": {"k": dict(later)}}
    merge(into, {"runs": {"k": redone}})
    assert into["runs"]["k"] == later


def test_search_records_merge_like_runs() -> None:
    """``many_budgets.py``'s one-run searches (``searches``) come over from the shard that made
    them, are not replaced by a failure, and a later stamp wins; they are not counted as runs."""
    merge = _merge()
    made = {"status": "ok", "seconds": 10.0, "finished": "2026-12-02T14:00:00Z"}
    redone = {"status": "ok", "seconds": 12.0, "finished": "2026-12-02T15:00:00Z"}
    into = {"runs": {}, "searches": {"a/cacp/0": dict(made)}}
    assert merge(into, {"searches": {"b/cacp/0": dict(made), "a/cacp/0": {"status": "fail"}}}) == 0
    assert into["searches"] == {"a/cacp/0": made, "b/cacp/0": made}
    merge(into, {"searches": {"a/cacp/0": dict(redone)}})
    merge(into, {"searches": {"a/cacp/0": dict(made)}})  # a stale copy merged last
    assert into["searches"]["a/cacp/0"] == redone
