"""Merge the results JSON of benchmark shards run in parallel into one file.

A benchmark sharing ``methods.py``'s protocol (``methods.py``, ``learned_masks.py``,
``rank_depth.py``, ``many_budgets.py``) keeps its finished runs in one JSON. To use both cores,
run two shards from separate clones (e.g. ``--datasets fashion-mnist`` in one,
``--datasets cifar10-partial`` in the other, each with ``--threads 1``), then::

    python benchmarks/merge_results.py benchmarks/results/methods.json /tmp/shard/benchmarks/results/methods.json
    python benchmarks/methods.py --report-only

A shard's run (or search record) replaces the one of the same key unless that one is finished and the shard's
failed, or the shard's is older (``finished`` stamps; a clone carries stale copies of runs
redone elsewhere); per-data-set records (baselines, fine-tune steps, tuning grids) are merged data
set by data set, the shard's entries winning, and tuning grids value by value; the shard's
tuned LRs in ``config`` replace ours only for data sets it has tuned at least as far.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_json, write_json  # noqa: E402

#: Top-level records keyed by run (``data set/row/seed``; ``searches``: the one-run searches of
#: ``many_budgets.py``, ``data set/method/seed``), merged record by record.
KEYED = ("runs", "searches")
#: Top-level records keyed by data set (merged per data set, not replaced).
PER_DATASET = ("baselines", "ft_steps", "tuning", "tuning_ucp", "tuning_copied_from")
#: Of those, the tuning grids (value -> result): merged value by value, so a shard that did
#: not tune a data set (its copy of the grid is older) loses none of ours.
TUNING = ("tuning", "tuning_ucp")
#: ``config`` entries keyed by data set.
CONFIG_PER_DATASET = ("ft_lr", "ucp_lr", "lr_source")


def _tuned_as_far(into: dict[str, Any], shard: dict[str, Any], ds: str) -> bool:
    """Whether ``shard`` holds at least as many tuning values for ``ds`` as ``into``, in every
    grid: only then do its tuned LRs for ``ds`` replace ours."""
    return all(len(shard.get(name, {}).get(ds, {})) >= len(into.get(name, {}).get(ds, {})) for name in TUNING)


def _replaces(theirs: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether a shard's run record replaces ours: not a failure over a finished run, and not
    older by its ``finished`` stamp (a shard's stale copy of a run redone here; a record
    without a stamp predates stamping)."""
    if mine.get("status") == "ok" and theirs.get("status") != "ok":
        return False
    return "finished" not in mine or theirs.get("finished", "") >= mine["finished"]


def merge(into: dict[str, Any], shard: dict[str, Any]) -> int:
    """Merge ``shard``'s runs, search records and per-data-set records into ``into`` (in place).
    Returns the number of runs taken from ``shard``."""
    taken = 0
    for name in KEYED:
        for key, rec in shard.get(name, {}).items():
            records = into.setdefault(name, {})
            mine = records.get(key)
            if mine is None or _replaces(rec, mine):
                taken += name == "runs" and mine != rec
                records[key] = rec
    datasets = {ds for name in PER_DATASET for ds in shard.get(name, {})}
    newer = {ds for ds in datasets if _tuned_as_far(into, shard, ds)}  # before the grids merge
    for name in PER_DATASET:
        for ds, value in shard.get(name, {}).items():
            mine = into.setdefault(name, {}).get(ds)
            into[name][ds] = {**mine, **value} if name in TUNING and isinstance(mine, dict) else value
    config = into.setdefault("config", {})
    for name in CONFIG_PER_DATASET:
        theirs = shard.get("config", {}).get(name, {})
        config.setdefault(name, {}).update({ds: v for ds, v in theirs.items() if ds in newer or ds not in datasets})
    return taken


def main(argv: list[str] | None = None) -> int:
    """Merge every shard into the first file, written atomically. Returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("into", type=Path, help="results JSON to merge into (created when absent)")
    p.add_argument("shards", type=Path, nargs="+", help="results JSON of the shards")
    args = p.parse_args(argv)
    results = read_json(args.into, {})
    for path in args.shards:
        if not path.exists():
            raise SystemExit(f"merge_results: shard {path} does not exist")
        print(f"{path}: {merge(results, read_json(path, {}))} run(s) taken")
    write_json(args.into, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
