"""Speedup benchmark: does halving FLOPs with prunekit make CPU inference faster?

ResNet-50, MobileNetV2 and ViT-B/16 (torchvision, ``weights=None``) are pruned with the
final classifier ignored, at the channel ratio found by bisection so that FLOPs fall to
about 50% (one ``pk.trace`` graph reused across iterations). The original and the pruned
model are then timed on CPU with ``prunekit.measure.measure_latency`` at batch 1 and 8 with
a fixed thread count. Original and pruned runs alternate ``--repeats`` times and the lowest
median is kept, which damps interference from other processes on a shared machine.

Efficiency = (1 - latency ratio) / (1 - FLOPs ratio): 1 means latency fell exactly as much
as FLOPs, 0 means no speedup.

Usage::

    python benchmarks/speedup.py
    python benchmarks/speedup.py --models resnet50 --target 0.5 --threads 2 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import prunekit as pk
from prunekit.measure import count_flops, count_params, measure_latency

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, machine_line, md_table, write_json  # noqa: E402

log = logging.getLogger("speedup")

DEFAULT_MODELS = ["resnet50", "mobilenet_v2", "vit_b_16"]
NUM_CLASSES = 1000


def build(name: str) -> tuple[nn.Module, nn.Module]:
    """A seeded, randomly initialised torchvision model in eval mode, and its final classifier."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    heads = [m for m in model.modules()
             if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
             or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == NUM_CLASSES)]
    if not heads:
        raise RuntimeError(f"{name}: no classifier producing {NUM_CLASSES} outputs")
    return model, heads[-1]


def example(batch: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """A seeded random image batch."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward (prunekit counts nn.MultiheadAttention and CPU attention too)."""
    from prunekit.measure import count_flops

    return count_flops(model, x)


def bisect_ratio(model: nn.Module, x: torch.Tensor, graph: Any, target: float, iters: int,
                 hi: float) -> tuple[float, nn.Module, float, list[dict[str, float]]]:
    """Find the channel ratio whose pruned model has FLOPs closest to ``target`` x original.

    Returns (ratio, pruned model, FLOPs ratio, per-iteration history)."""
    base = flops(model, x)
    lo, best, history = 0.0, None, []
    for _ in range(iters):
        mid = (lo + hi) / 2
        t0 = time.perf_counter()
        small = pk.prune(model, x, ratio=mid, graph=graph)
        fr = flops(small, x) / base
        history.append({"ratio": mid, "flops_ratio": fr, "prune_s": time.perf_counter() - t0})
        log.info("  ratio %.4f -> FLOPs ratio %.4f", mid, fr)
        if best is None or abs(fr - target) < abs(best[2] - target):
            best = (mid, small, fr)
        if fr > target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best[0], best[1], best[2], history


def time_pair(model: nn.Module, small: nn.Module, x: torch.Tensor, threads: int, min_run_time: float,
              repeats: int) -> dict[str, Any]:
    """Latency of original and pruned model, alternating; the lowest median of each is kept."""
    before, after = [], []
    for _ in range(repeats):
        before.append(measure_latency(model, x, threads=threads, min_run_time=min_run_time))
        after.append(measure_latency(small, x, threads=threads, min_run_time=min_run_time))
    b = min(before, key=lambda s: s.median_ms)
    a = min(after, key=lambda s: s.median_ms)
    return {"before": b.to_dict(), "after": a.to_dict(),
            "before_medians_ms": [s.median_ms for s in before], "after_medians_ms": [s.median_ms for s in after],
            "latency_ratio": a.median_ms / b.median_ms}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Prune one model to the FLOPs target and time it before/after at each batch size."""
    model, head = build(name)
    x = example(1)
    t0 = time.perf_counter()
    graph = pk.trace(model, x, ignore=[head])
    trace_s = time.perf_counter() - t0
    ratio, small, flops_ratio, history = bisect_ratio(model, x, graph, args.target, args.iters, args.max_ratio)
    small.eval()
    rec: dict[str, Any] = {"model": name, "ratio": ratio, "flops_ratio": flops_ratio, "trace_s": trace_s,
                           "params": count_params(model), "params_ratio": count_params(small) / count_params(model),
                           "flops": flops(model, x),
                           "bisection": history, "timings": []}
    for threads in args.threads:
        for batch in args.batches:
            xb = example(batch, seed=1)
            res = time_pair(model, small, xb, threads, args.min_run_time, args.repeats)
            lat = res["latency_ratio"]
            res["efficiency"] = (1 - lat) / (1 - flops_ratio) if flops_ratio < 1 else None
            res.update(batch=batch, threads=threads)
            rec["timings"].append(res)
            log.info("  batch %d, %d threads: %.1f ms -> %.1f ms (latency ratio %.3f, efficiency %.2f)", batch,
                     threads, res["before"]["median_ms"], res["after"]["median_ms"], lat, res["efficiency"])
    return rec


def write_markdown(data: dict[str, Any], path: Path) -> None:
    """Markdown table of the results."""
    rows = []
    for rec in data["models"]:
        for res in rec["timings"]:
            rows.append([rec["model"], rec["ratio"], rec["params_ratio"], rec["flops_ratio"], res["batch"], res["threads"],
                         res["before"]["median_ms"], res["after"]["median_ms"], res["latency_ratio"],
                         res["efficiency"]])
    cfg = data["config"]
    lines = ["# Speedup: prunekit at ~50% FLOPs, CPU latency", "", machine_line(data["machine"]), "",
             f"Target FLOPs ratio {cfg['target']}, {cfg['iters']} bisection steps on the channel ratio, "
             f"threads {cfg['threads']}, `measure_latency(min_run_time={cfg['min_run_time']})`, "
             f"lowest median of {cfg['repeats']} alternating repeats. Load average (1 min) at start: "
             f"{data['machine'].get('loadavg_1m')}, at end: {data.get('loadavg_end')}.", "",
             md_table(["model", "channel ratio", "params ratio", "FLOPs ratio", "batch", "threads", "before ms", "after ms",
                       "latency ratio", "efficiency"], rows), "",
             "Efficiency = (1 - latency ratio) / (1 - FLOPs ratio). FLOPs from `prunekit.measure.count_flops` "
             "(which counts nn.MultiheadAttention and CPU attention).", ""]
    cores = data["machine"].get("usable_cores") or data["machine"].get("cpu_count") or 1
    busy = max(data["machine"].get("loadavg_1m") or 0, data.get("loadavg_end") or 0)
    if busy + max(cfg["threads"]) > cores + 0.5:
        lines.append(f"**Warning:** load average up to {busy} on {cores} cores while timing: other processes "
                     f"competed for the CPU, so these latencies (above all with more than one thread, where "
                     f"OpenMP threads wait on each other) are noisy; see the per-repeat medians in the JSON.")
        lines.append("")
    for name, err in data.get("failures", {}).items():
        lines.append(f"- {name} FAILED: `{err}`")
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated torchvision models")
    p.add_argument("--target", type=float, default=0.5, help="target FLOPs ratio (default 0.5)")
    p.add_argument("--iters", type=int, default=6, help="bisection steps (default 6)")
    p.add_argument("--max-ratio", type=float, default=0.9, help="upper end of the ratio search (default 0.9)")
    p.add_argument("--batches", default="1,8", help="batch sizes to time (default 1,8)")
    p.add_argument("--threads", default="2", help="comma-separated intra-op thread counts to time with (default 2)")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement (default 2.0)")
    p.add_argument("--repeats", type=int, default=3, help="alternating before/after repeats (default 3)")
    p.add_argument("--out", default=str(RESULTS_DIR / "speedup.json"), help="JSON results file")
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON and exit")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every model and write JSON + Markdown results."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # untimed work (pruning, FLOPs); measure_latency sets its own count
    out = Path(args.out)
    if args.report_only:
        write_markdown(json.loads(out.read_text()), out.with_suffix(".md"))
        return
    data: dict[str, Any] = {"machine": machine_info(), "config": {k: v for k, v in vars(args).items() if k != "out"},
                            "models": []}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        log.info("%s", name)
        try:
            data["models"].append(run_model(name, args))
        except Exception as exc:  # noqa: BLE001 - recorded for the engine owner
            log.exception("%s failed", name)
            data.setdefault("failures", {})[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        data["loadavg_end"] = round(os.getloadavg()[0], 2)
        write_json(out, data)
        write_markdown(data, out.with_suffix(".md"))
    log.info("results in %s", out)


if __name__ == "__main__":
    main()
