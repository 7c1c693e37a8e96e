"""Partition Pruning speed-up: TinyVGG-like FC layers split into P partitions, run on P threads.

The paper (Shahhosseini et al. 2019) times the pruned, partitioned FC layers of TinyVGG16 on P
accelerators against the unpruned FC layers on one. Here the accelerators are CPU worker
threads (one intra-op thread each) of this machine:

* **Model.** The FC stack of a TinyVGG16-like classifier on flattened conv features:
  ``Linear(2048, 4096) - ReLU - Dropout - Linear(4096, 4096) - ReLU - Dropout - Linear(4096, 200)``
  (512 x 2 x 2 features of 64 px Tiny-ImageNet images, 200 classes), random weights (latency does
  not depend on their values), eval mode. The input is the flattened feature vector.
* **Pruning.** ``methods.get("partition")(fc, x, partitions=P, ratio=r)`` for P in ``--partitions``
  and r in ``--ratios``: both 4096-wide layers are split into P partitions, the second one's
  cross-partition weights cut, each partition losing the fraction r of its units; the
  200-class layer stays whole (its outputs are the classes).
* **Timing.** ``prunekit.measure.measure_latency`` (``torch.utils.benchmark`` ``blocked_autorange``)
  at batch 1 and 16: the unpruned layers on one thread (the baseline, "1 worker"); the pruned,
  partitioned layers with their P blocks on P worker threads (the paper's setting); the same
  pruned layers sequentially on one thread (what pruning alone buys); and the unpruned layers
  with P intra-op threads (plain multithreading, the honest CPU alternative). Rounds alternate
  ``--repeats`` times and the lowest median is kept (damps other processes' interference).
  Outputs of the parallel and sequential runs are checked equal.

Energy is not measured: this CPU exposes no energy counter to us (no RAPL access), so only
the speed-up half of the paper's claim is checked. Accuracy is not measured either (random
weights; recovering it needs a trained TinyVGG and fine-tuning).

Usage::

    python benchmarks/partition.py                              # P = 1, 2, 4; ratios 0 and 0.5
    python benchmarks/partition.py --partitions 1,2,4,8 --ratios 0,0.5,0.75 --repeats 3 --min-run-time 1
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit import methods
from prunekit.measure import count_flops, count_params, measure_latency
from prunekit.surgery.partitioned import PartitionedLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, machine_line, md_table, write_json  # noqa: E402

FEATURES, HIDDEN, CLASSES = 2048, 4096, 200


def tiny_vgg_fc() -> nn.Module:
    """The seeded FC stack of a TinyVGG16-like classifier (eval mode)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Dropout(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Dropout(), nn.Linear(HIDDEN, CLASSES)).eval()


def set_parallel(model: nn.Module, on: bool) -> None:
    """Switch every PartitionedLinear of ``model`` between worker threads and sequential."""
    for m in model.modules():
        if isinstance(m, PartitionedLinear):
            m.parallel = on


def timed(model: nn.Module, x: torch.Tensor, threads: int, args: argparse.Namespace) -> float:
    """Median latency in ms, ``threads`` intra-op threads on the calling thread."""
    return measure_latency(model, x, threads=threads, warmup=3, min_run_time=args.min_run_time).median_ms


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, prune and time every configuration; returns the JSON-ready results."""
    torch.set_num_threads(1)
    dense = tiny_vgg_fc()
    batches = [int(b) for b in args.batches.split(",")]
    parts = [int(p) for p in args.partitions.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    inputs = {b: torch.randn(b, FEATURES, generator=torch.Generator().manual_seed(b)) for b in batches}
    x1 = inputs[batches[0]]
    base_params, base_flops = count_params(dense), count_flops(dense, x1[:1])
    pruned: dict[tuple[int, float], Any] = {}
    for P in parts:
        for r in ratios:
            res = methods.get("partition")(dense, x1, partitions=P, ratio=r)
            pruned[(P, r)] = res
    rows: dict[str, dict[str, Any]] = {}
    best: dict[str, float] = {}

    def keep(key: str, ms: float) -> None:
        best[key] = min(best.get(key, float("inf")), ms)

    for _ in range(args.repeats):
        for b, x in inputs.items():
            keep(f"dense/1/b{b}", timed(dense, x, 1, args))
            for P in parts:
                if P > 1:
                    keep(f"dense/{P}/b{b}", timed(dense, x, P, args))
            for (P, r), res in pruned.items():
                set_parallel(res.model, True)
                keep(f"part/{P}/{r}/par/b{b}", timed(res.model, x, 1, args))
                set_parallel(res.model, False)
                keep(f"part/{P}/{r}/seq/b{b}", timed(res.model, x, 1, args))
    for (P, r), res in pruned.items():
        x = inputs[batches[-1]]
        with torch.no_grad():
            set_parallel(res.model, True)
            par = res.model(x)
            set_parallel(res.model, False)
            seq = res.model(x)
        info = res.info
        row: dict[str, Any] = {
            "partitions": P, "ratio": r, "params": count_params(res.model), "flops": count_flops(res.model, x1[:1]),
            "params_kept": count_params(res.model) / base_params,
            "flops_kept": count_flops(res.model, x1[:1]) / base_flops,
            "kept_per_partition": {n: v["kept_per_partition"] for n, v in info["layers"].items()},
            "traffic_values_per_row": info["traffic"]["total_after"],
            "traffic_before": info["traffic"]["total_before"],
            "parallel_equals_sequential": bool(torch.equal(par, seq)),
        }
        for b in batches:
            base = best[f"dense/1/b{b}"]
            row[f"b{b}"] = {"parallel_ms": best[f"part/{P}/{r}/par/b{b}"], "sequential_ms": best[f"part/{P}/{r}/seq/b{b}"],
                            "dense_1_ms": base, "dense_P_threads_ms": best.get(f"dense/{P}/b{b}", base),
                            "speedup_parallel": base / best[f"part/{P}/{r}/par/b{b}"],
                            "speedup_sequential": base / best[f"part/{P}/{r}/seq/b{b}"],
                            "speedup_dense_P_threads": base / best.get(f"dense/{P}/b{b}", base)}
        rows[f"P{P}/r{r}"] = row
    return {"machine": machine_info(), "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "model": {"layers": [FEATURES, HIDDEN, HIDDEN, CLASSES], "params": base_params, "flops_b1": base_flops},
            "options": {"batches": batches, "partitions": parts, "ratios": ratios, "repeats": args.repeats,
                        "min_run_time": args.min_run_time},
            "rows": rows}


def report(results: dict[str, Any], path: Path) -> None:
    """The Markdown table of ``results``."""
    m = results["machine"]
    batches = results["options"]["batches"]
    lines = ["# Partition Pruning: TinyVGG-like FC layers on P CPU workers", "",
             machine_line(m) + f"; load average {m.get('loadavg_1m')} before, "
             f"{results['loadavg_after'][0]} after (1 min); {m.get('usable_cores')} usable cores.", "",
             f"FC stack {' - '.join(map(str, results['model']['layers']))} ({results['model']['params'] / 1e6:.1f} M "
             "parameters), random weights, eval mode. Latency: `prunekit.measure.measure_latency` (median, best of "
             f"{results['options']['repeats']} alternating rounds, {results['options']['min_run_time']} s each). "
             "Speed-up = unpruned layers on 1 thread / the row's latency. *parallel*: the P blocks on P worker threads "
             "(1 intra-op thread each); *sequential*: the same pruned layers on 1 thread; *dense P thr*: the unpruned "
             "layers with P intra-op threads. Traffic: values a worker receives from the others per input row "
             "(before: the same layers split by outputs only, unpruned).", ""]
    header = ["P", "ratio", "params kept", "FLOPs kept", "units/partition", "traffic (before)", "par = seq"]
    for b in batches:
        header += [f"b{b} base ms", f"b{b} parallel ms", f"b{b} speed-up parallel", f"b{b} speed-up sequential",
                   f"b{b} speed-up dense P thr"]
    body = []
    for row in results["rows"].values():
        units = "/".join(str(v) for v in row["kept_per_partition"].values())
        cells: list[Any] = [row["partitions"], row["ratio"], row["params_kept"], row["flops_kept"], units,
                            f"{row['traffic_values_per_row']} ({row['traffic_before']})", row["parallel_equals_sequential"]]
        for b in batches:
            c = row[f"b{b}"]
            cells += [c["dense_1_ms"], c["parallel_ms"], c["speedup_parallel"], c["speedup_sequential"],
                      c["speedup_dense_P_threads"]]
        body.append(cells)
    lines += [md_table(header, body), "",
              "Energy is not measured: this CPU gives us no energy counter (no RAPL access), so the paper's 2.73x "
              "energy claim is not checked. Accuracy is not measured (random weights).",
              "On a machine with fewer cores than P, the P workers share cores, so the parallel column cannot show "
              "more than the core count's speed-up from parallelism; the rest comes from pruning.", ""]
    if m.get("loadavg_1m", 0) and m.get("loadavg_1m", 0) > 0.5 * (m.get("usable_cores") or 1):
        lines.append(f"**The machine was loaded** (1-min load average {m.get('loadavg_1m')} on "
                     f"{m.get('usable_cores')} cores) by another job: these numbers are not final.")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Parse options, run, write ``partition.json`` and ``partition.md``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--partitions", default="1,2,4", help="comma-separated partition counts (default 1,2,4)")
    p.add_argument("--ratios", default="0,0.5", help="comma-separated fractions of units removed per partition")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    p.add_argument("--repeats", type=int, default=2, help="alternating timing rounds, best kept (default 2)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing (default 0.5)")
    p.add_argument("--out", default=str(RESULTS_DIR / "partition"), help="results path without suffix")
    args = p.parse_args(argv)
    results = run(args)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), results)
    report(results, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
