"""Speedup benchmark: does latency fall as much as FLOPs? η per model, ratio, batch, backend, threads.

For every model (torchvision, ``weights=None``, seeded, eval mode, the 1000-way classifier
ignored) and every ratio ``r`` (the fraction of **FLOPs removed**: ``pk.prune(target_flops=1 - r)``,
landing within 1%; at r = 0.5 FLOPs removed and kept coincide), the original, the pruned model
with ``round_to=1`` and with ``round_to="auto"`` (the multiple chosen on the backend and thread
count being timed, from an exact-width table at the timed batch), and the *floor* (every group at
``min_channels=1``: what no pruning ratio can go below) are timed at each batch size, backend
(PyTorch eager; ONNX Runtime CPU if onnx and onnxruntime are installed) and intra-op thread count.

    η = (1 - latency ratio) / (1 - FLOPs ratio)

1 means latency fell exactly as much as FLOPs, 0 no speedup, negative a slower model.

Every measurement (``measure_latency`` / an ONNX Runtime session, ``--min-run-time`` seconds) is
repeated until two of its runs agree within ``--agree`` (5%), at most ``--max-repeats`` times; the
mean of the closest agreeing pair is reported (the lowest run, flagged, when none agree). The
1-minute load average is recorded before and after each measurement; the report flags rows where
it exceeded the benchmark's own threads + 1 (another process was competing). Variants whose
architecture is identical (``auto`` choosing a multiple that gives the ``round_to=1`` widths) are
timed once.

Usage::

    python benchmarks/speedup.py                                   # the full run (hours: see README)
    python benchmarks/speedup.py --models mobilenet_v2 --ratios 0.5 --batches 1 --threads 1 --max-repeats 1
    python benchmarks/speedup.py --backends eager --roundings 1     # no ONNX Runtime, no auto rows
    python benchmarks/speedup.py --report-only                      # rebuild the Markdown from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from torch import nn

import prunekit as pk
from prunekit.measure import count_flops, count_params, measure_latency
from prunekit.measure.onnx_latency import onnx_bytes, onnxruntime_available, ort_session, time_session
from prunekit.measure.width_table import build_width_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, machine_line, md_table, write_json  # noqa: E402

log = logging.getLogger("speedup")

DEFAULT_MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "regnet_y_800mf", "vit_b_16"]
DEFAULT_RATIOS = "0.2,0.3,0.5,0.7"
NUM_CLASSES = 1000
#: The issue's targets for η at ratio 0.5, by batch size (batch 1 / larger batches).
TARGET_ETA = {1: 0.8, "large": 0.9}


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


def signature(model: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The architecture as the shapes of its parameters: equal for variants that run the same."""
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def load() -> float:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2)


def until_agree(run: Callable[[], float], agree: float, max_repeats: int) -> dict[str, Any]:
    """Call ``run`` (one latency in ms) until two results agree within ``agree`` (relative to the
    smaller), at most ``max_repeats`` times; the load average is read before and after each call.
    Returns the mean of the closest agreeing pair (else the lowest run, ``agreed`` false), every
    run and the loads."""
    runs: list[float] = []
    loads: list[tuple[float, float]] = []
    pair = None
    while len(runs) < max(1, max_repeats):
        before = load()
        runs.append(float(run()))
        loads.append((before, load()))
        close = [(abs(a - runs[-1]) / min(a, runs[-1]), a) for a in runs[:-1]
                 if abs(a - runs[-1]) <= agree * min(a, runs[-1])]
        if close:
            pair = (min(close)[1], runs[-1])
            break
    value = float(np.mean(pair)) if pair else min(runs)
    return {"ms": value, "agreed": pair is not None, "runs_ms": runs, "load_before_after": loads,
            "load_max": max(max(p) for p in loads)}


class Timer:
    """Latency of model variants on one backend, thread count and batch: each architecture timed
    once (cached by :func:`signature`), ONNX exports reused across thread counts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.exports: dict[tuple[Any, ...], bytes] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor, backend: str, threads: int) -> dict[str, Any]:
        """The :func:`until_agree` record of ``model`` on ``x``."""
        key = (signature(model), tuple(x.shape), backend, threads)
        if key in self.cache:
            return {**self.cache[key], "reused": True}
        a = self.args
        if backend == "eager":
            def run() -> float:
                return measure_latency(model, x, threads=threads, min_run_time=a.min_run_time,
                                       warmup=a.warmup).median_ms
        else:
            ekey = (signature(model), tuple(x.shape))
            if ekey not in self.exports:
                if len(self.exports) >= 2:  # ViT-B exports are ~350 MB: keep the last two only
                    self.exports.pop(next(iter(self.exports)))
                self.exports[ekey] = onnx_bytes(model, x)
            session = ort_session(self.exports[ekey], threads)
            feeds = {session.get_inputs()[0].name: x.numpy()}

            def run() -> float:
                return time_session(session, feeds, threads=threads, batch_size=x.shape[0],
                                    min_run_time=a.min_run_time, warmup=a.warmup).median_ms
        rec = until_agree(run, a.agree, a.max_repeats)
        self.cache[key] = rec
        return rec


def eta(latency_ratio: float, flops_ratio: float) -> float | None:
    """(1 - latency ratio) / (1 - FLOPs ratio); None when nothing was removed."""
    return (1 - latency_ratio) / (1 - flops_ratio) if flops_ratio < 1 - 1e-9 else None


def run_model(name: str, args: argparse.Namespace, timer: Timer) -> dict[str, Any]:
    """Prune one model at every ratio (and to its floor), then time every variant."""
    model, head = build(name)
    x1 = example(1)
    graph = pk.trace(model, x1, ignore=[head])
    base_flops = count_flops(model, x1)
    rec: dict[str, Any] = {"model": name, "flops": base_flops, "params": count_params(model), "load_start": load(),
                           "variants": {}, "rows": []}
    variants: dict[str, nn.Module] = {}
    for r in args.ratios:
        t0 = time.perf_counter()
        small, plan = pk.prune(model, x1, target_flops=1 - r, graph=graph, return_plan=True)
        variants[f"r{r:g}"] = small.eval()
        rec["variants"][f"r{r:g}"] = {"ratio": r, "flops_ratio": count_flops(small, x1) / base_flops,
                                      "params_ratio": count_params(small) / rec["params"],
                                      "prune_s": time.perf_counter() - t0}
    floor = pk.prune(model, x1, ratio=0.9999, graph=graph).eval()  # every group down to min_channels
    variants["floor"] = floor
    rec["variants"]["floor"] = {"flops_ratio": count_flops(floor, x1) / base_flops,
                                "params_ratio": count_params(floor) / rec["params"]}
    log.info("%s: pruned %s", name, {k: round(v["flops_ratio"], 3) for k, v in rec["variants"].items()})
    for batch in args.batches:
        xb = example(batch, seed=1)
        for backend in args.backends:
            for threads in args.threads:
                where = dict(batch=batch, backend=backend, threads=threads)
                orig = timer(model, xb, backend, threads)
                fl = timer(floor, xb, backend, threads)
                rec["rows"].append({**where, "variant": "floor", "rounding": None,
                                    "flops_ratio": rec["variants"]["floor"]["flops_ratio"], "original": orig,
                                    "pruned": fl, "latency_ratio": fl["ms"] / orig["ms"]})
                table = None
                for r in args.ratios:
                    key = f"r{r:g}"
                    for rounding in args.roundings:
                        if rounding == "1":
                            small, meta = variants[key], {}
                        else:
                            if table is None:  # one exact-width table per (model, batch, backend, threads)
                                t0 = time.perf_counter()
                                table = build_width_table(model, xb, backend=backend, threads=threads,
                                                          model_ms=orig["ms"], min_run_time=args.table_min_run_time)
                                rec.setdefault("table_s", {})[f"{backend}/{threads}/{batch}"] = time.perf_counter() - t0
                            small, plan = pk.prune(model, x1, target_flops=1 - r, graph=graph, round_to="auto",
                                                   width_table=table, return_plan=True)
                            small.eval()
                            meta = {"chosen": plan.meta["round_to"], "auto": plan.meta["round_to_auto"]}
                        res = timer(small, xb, backend, threads)
                        fr = count_flops(small, x1) / base_flops
                        lr = res["ms"] / orig["ms"]
                        row = {**where, "variant": key, "ratio": r, "rounding": rounding, "flops_ratio": fr,
                               "original": orig, "pruned": res, "latency_ratio": lr, "eta": eta(lr, fr), **meta}
                        rec["rows"].append(row)
                        log.info("  %s bs%d %s %dt round_to=%s%s: %.2f -> %.2f ms, FLOPs %.3f, eta %s", name, batch,
                                 backend, threads, rounding, f"->{meta['chosen']}" if meta else "", orig["ms"],
                                 res["ms"], fr, f"{row['eta']:.2f}" if row["eta"] is not None else "-")
    return rec


def _busy(row: dict[str, Any]) -> bool:
    """Whether another process competed: the load exceeded the benchmark's own threads + 1."""
    return max(row["original"]["load_max"], row["pruned"]["load_max"]) > row["threads"] + 1


def write_markdown(data: dict[str, Any], path: Path) -> None:
    """The η tables (one row per model x batch x backend x threads x ratio x rounding), the floor,
    and the ratio-0.5 summary against the issue's targets."""
    cfg = data["config"]
    lines = [f"# Speedup: η = (1 - latency ratio) / (1 - FLOPs ratio){' — ' + data['note'] if data.get('note') else ''}",
             "", machine_line(data["machine"]), "",
             f"Ratio = fraction of FLOPs removed (`pk.prune(target_flops=1 - ratio)`). Batches {cfg['batches']}, "
             f"backends {cfg['backends']}, threads {cfg['threads']}, roundings {cfg['roundings']}; each latency "
             f"repeated until two runs agree within {100 * cfg['agree']:g}% (at most {cfg['max_repeats']}), "
             f"`min_run_time={cfg['min_run_time']}` s. Load average (1 min) at start "
             f"{data['machine'].get('loadavg_1m')}, at end {data.get('loadavg_end')}; "
             "**busy** marks rows where it exceeded the benchmark's threads + 1 during the measurement.", ""]
    rows, floors = [], []
    for rec in data["models"]:
        for row in rec["rows"]:
            o, p = row["original"], row["pruned"]
            agreed = "yes" if o["agreed"] and p["agreed"] else "no"
            loads = f"{o['load_before_after'][0][0]}/{p['load_before_after'][-1][1]}"
            busy = "**busy**" if _busy(row) else ""
            common = [rec["model"], row["batch"], row["backend"], row["threads"]]
            if row["variant"] == "floor":
                floors.append(common + [row["flops_ratio"], o["ms"], p["ms"], row["latency_ratio"], agreed, loads, busy])
                continue
            rnd = row["rounding"] if row["rounding"] == "1" else f"auto→{row.get('chosen')}"
            rows.append(common + [row["ratio"], rnd, row["flops_ratio"], o["ms"], p["ms"], row["latency_ratio"],
                                  row["eta"], agreed, loads, busy])
    lines += ["## η", "", md_table(["model", "batch", "backend", "threads", "ratio", "round_to", "FLOPs kept",
                                    "original ms", "pruned ms", "latency ratio", "η", "agreed", "load before/after",
                                    ""], rows), ""]
    lines += ["## Floor (every group at min_channels=1)", "",
              "The latency no ratio can go below: what stays is the unprunable part (stem, classifier, "
              "ops whose cost does not follow the channels) and the per-op overhead.", "",
              md_table(["model", "batch", "backend", "threads", "FLOPs kept", "original ms", "floor ms",
                        "latency ratio", "agreed", "load before/after", ""], floors), ""]
    summary = []
    for rec in data["models"]:
        for row in rec["rows"]:
            if row.get("ratio") == 0.5 and row["rounding"] == "1":
                goal = TARGET_ETA[1] if row["batch"] == 1 else TARGET_ETA["large"]
                auto = next((r for r in rec["rows"] if r.get("ratio") == 0.5 and r["rounding"] == "auto"
                             and all(r[k] == row[k] for k in ("batch", "backend", "threads"))), None)
                summary.append([rec["model"], row["batch"], row["backend"], row["threads"], row["eta"],
                                auto["eta"] if auto else None, f"auto→{auto['chosen']}" if auto else "", goal,
                                "met" if row["eta"] is not None and row["eta"] >= goal else "**missed**"])
    if summary:
        lines += ["## Ratio 0.5 against the targets (η ≥ 0.8 at batch 1, ≥ 0.9 at batch 16)", "",
                  md_table(["model", "batch", "backend", "threads", "η round_to=1", "η auto", "auto chose", "target",
                            "round_to=1"], summary), ""]
    runs = []
    for rec in data["models"]:
        differs = {k: v for k, v in rec.get("config", {}).items() if k != "models" and cfg.get(k) != v}
        runs.append([rec["model"], rec.get("date"), rec.get("load_start"), rec.get("table_s") and
                     round(sum(rec["table_s"].values()), 1), ", ".join(f"{k}={v}" for k, v in differs.items())])
    lines += ["## Runs", "", md_table(["model", "date", "load at start", "width tables s",
                                       "options other than above"], runs), ""]
    negative = [f"{rec['model']} bs{r['batch']} {r['backend']} {r['threads']}t ratio {r['ratio']} round_to={r['rounding']}"
                for rec in data["models"] for r in rec["rows"] if r.get("eta") is not None and r["eta"] < 0]
    lines.append("η < 0 (pruned model slower): " + ("; ".join(negative) if negative else "none") + ".")
    lines.append("")
    for name, err in data.get("failures", {}).items():
        lines.append(f"- {name} FAILED: `{err}`")
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated torchvision models")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help=f"fractions of FLOPs removed (default {DEFAULT_RATIOS})")
    p.add_argument("--batches", default="1,16", help="batch sizes to time (default 1,16)")
    p.add_argument("--backends", default="eager,onnxruntime",
                   help="eager and/or onnxruntime (default both; onnxruntime is dropped with a note when missing)")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts (default 1,2)")
    p.add_argument("--roundings", default="1,auto", help="round_to values: 1 and/or auto (default both)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement (default 1.0)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement (default 2)")
    p.add_argument("--agree", type=float, default=0.05, help="two runs agreeing within this stop (default 0.05)")
    p.add_argument("--max-repeats", type=int, default=5, help="cap on the runs per measurement (default 5)")
    p.add_argument("--table-min-run-time", type=float, default=0.05,
                   help="seconds per layer width in round_to=auto's width table (default 0.05)")
    p.add_argument("--note", default="", help="a note written into the report's title (e.g. 'smoke test')")
    p.add_argument("--out", default=str(RESULTS_DIR / "speedup_eta.json"), help="JSON results file")
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON and exit")
    p.add_argument("--fresh", action="store_true",
                   help="start the JSON over (default: keep the results of models this run does not redo)")
    args = p.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if not all(0 < r < 1 for r in args.ratios):
        p.error(f"--ratios {args.ratios}: fractions of FLOPs removed, in (0, 1)")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.roundings = [r.strip() for r in args.roundings.split(",") if r.strip()]
    if bad := [b for b in args.backends if b not in ("eager", "onnxruntime")]:
        p.error(f"--backends {','.join(bad)}: eager or onnxruntime")
    if bad := [r for r in args.roundings if r not in ("1", "auto")]:
        p.error(f"--roundings {','.join(bad)}: 1 or auto")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every model and write JSON + Markdown results (rewritten after each model)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # untimed work (pruning, FLOPs); the timers set their own counts
    out = Path(args.out)
    if args.report_only:
        write_markdown(json.loads(out.read_text()), out.with_suffix(".md"))
        return
    notes = []
    if "onnxruntime" in args.backends and not onnxruntime_available():
        args.backends.remove("onnxruntime")
        notes.append("onnxruntime not installed: eager only")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "fresh", "report_only")}
    machine = machine_info()
    try:
        machine["onnxruntime"] = __import__("onnxruntime").__version__
    except ImportError:
        pass
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    data: dict[str, Any] = {"machine": machine, "config": config,
                            "note": "; ".join([args.note] * bool(args.note) + notes), "models": []}
    if out.exists() and not args.fresh:  # keep the models this run does not redo (one model per run works)
        old = json.loads(out.read_text())
        data["models"] = [m for m in old.get("models", []) if m["model"] not in names]
        data["failures"] = {k: v for k, v in old.get("failures", {}).items() if k not in names}
    timer = Timer(args)
    for name in names:
        log.info("%s", name)
        timer.cache.clear()
        timer.exports.clear()
        try:
            rec = run_model(name, args, timer)
            rec.update(date=machine_info()["date"], config=config)  # each model keeps the run it came from
            data["models"].append(rec)
        except Exception as exc:  # noqa: BLE001 - recorded, the other models still run
            log.exception("%s failed", name)
            data.setdefault("failures", {})[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        data["loadavg_end"] = load()
        write_json(out, data)
        write_markdown(data, out.with_suffix(".md"))
    log.info("results in %s", out)


if __name__ == "__main__":
    main()
