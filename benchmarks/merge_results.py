"""Merge the results JSON of benchmark shards run in parallel into one file.

A benchmark sharing ``methods.py``'s protocol (``methods.py``, ``learned_masks.py``,
``rank_depth.py``, ``many_budgets.py``) keeps its finished runs in one JSON. To use both cores,
run two shards from separate clones (e.g. ``--datasets fashion-mnist`` in one,
``--datasets cifar10-partial`` in the other, each with ``--threads 1``), then::

    python benchmarks/merge_results.py benchmarks/results/methods.json /tmp/shard/benchmarks/results/methods.json
    python benchmarks/methods.py --report-only

A shard's finished run replaces the run of the same key unless that one is finished and the
shard's failed; per-data-set records (baselines, fine-tune steps, tuning grids, the tuned LRs in
``config``) are merged data set by data set, the shard's entries winning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_json, write_json  # noqa: E402

#: Top-level records keyed by data set (merged per data set, not replaced).
PER_DATASET = ("baselines", "ft_steps", "tuning", "tuning_ucp")
#: ``config`` entries keyed by data set.
CONFIG_PER_DATASET = ("ft_lr", "ucp_lr", "lr_source")


def merge(into: dict[str, Any], shard: dict[str, Any]) -> int:
    """Merge ``shard``'s runs and per-data-set records into ``into`` (in place). Returns the
    number of runs taken from ``shard``."""
    runs = into.setdefault("runs", {})
    taken = 0
    for key, rec in shard.get("runs", {}).items():
        mine = runs.get(key)
        if mine is None or not (mine.get("status") == "ok" and rec.get("status") != "ok"):
            taken += mine != rec
            runs[key] = rec
    for name in PER_DATASET:
        for ds, value in shard.get(name, {}).items():
            into.setdefault(name, {})[ds] = value
    config = into.setdefault("config", {})
    for name in CONFIG_PER_DATASET:
        config.setdefault(name, {}).update(shard.get("config", {}).get(name, {}))
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
