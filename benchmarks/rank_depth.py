"""Rank and depth against width at equal FLOPs, from the trained ResNet-20 baselines (issue 12).

From the trained ResNet-20 of each data set (``benchmarks/baselines/``, ``prunekit.load(DIR)``),
every row prunes to the same FLOPs target (default keep 45%: the ~2.2x reduction of the TRP
paper), is evaluated on the full test split without fine-tuning, then fine-tuned with the one
schedule every row shares and evaluated again; params, FLOPs and *measured* latency (CPU, batch 1
and 16, ``prunekit.measure.measure_latency``) of each pruned model are recorded::

    python benchmarks/rank_depth.py                                  # every row, both data sets, seeds 0-2
    python benchmarks/rank_depth.py --datasets fashion-mnist --rows trp,svd:channel --seeds 0
    python benchmarks/rank_depth.py --max-steps 2 --seeds 0 --datasets fashion-mnist --rows svd:channel,block_drop \\
        --ft-lr 0.01 --results /tmp/rank_depth.json                  # smoke test
    python benchmarks/rank_depth.py --report-only                    # rebuild the Markdown
    nohup python benchmarks/rank_depth.py > benchmarks/results/rank_depth.log 2>&1 &   # the full table

Data, validation split, calibration batches, the shared fine-tune, seeds, 95% intervals and the
resumable results JSON are those of ``benchmarks/methods.py`` (imported from it): see its
docstring. One change, for the sizing (~5 h for three seeds, see ``benchmarks/README.md``): the
CIFAR-10 fine-tune is 6 epochs (222 steps) instead of 10 (``--ft-epochs`` sets it). Resumable: every finished (data set, row, seed) is kept and skipped on a rerun;
seeds run outermost.

Rows
----
Rank (the TRP comparison): ``trp`` (Trained Rank Pruning, channel-wise NC: trained with the
projection and the nuclear-norm term for as many steps as the fine-tune, on the fine-tune's
schedule, then decomposed to the target), ``svd:channel`` and ``svd:spatial`` (post-hoc
truncated SVD, channel-wise and spatial, ranks allocated to the target), ``cap``
(compensation-aware channel pruning) and ``criterion:l2`` (plain L2 channel removal).
Depth vs width (the ResConv comparison): ``resconv`` (fusible residual convs trained with L1 on
the layer factors for as many steps as the fine-tune, the fewest layers removed that meet the
target, the rest fused back), ``block_drop`` (whole residual branches dropped, ranked by their
output norm on the calibration batches) against ``criterion:l2``. ``trp:spatial`` (TRP's VH) is
available but not in the default rows. The classifier is kept whole by every row.

Fine-tune LR: ``--ft-lr``, else the LR that ``methods.py`` tuned on validation (``--lr-from``,
its complete grid; tuned there at 50% FLOPs with its own epochs), else tuned here on validation
after plain L2 removal at this target. Latency: each pruned model is timed with the baseline
timed right after it, and the ratio of the two is reported (the load of a shared machine drifts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from prunekit import methods as pk_methods  # noqa: E402
from prunekit.measure import measure_latency  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods as mb  # noqa: E402  (benchmarks/methods.py: data, context, fine-tune, grid, intervals)
from common import RESULTS_DIR, machine_line, md_table, write_json  # noqa: E402

log = logging.getLogger("rank_depth")
TARGET = 0.45
LATENCY_BATCHES = (1, 16)
DEFAULT_FT_EPOCHS = "fashion-mnist=1,cifar10-partial=6"  # sized to ~5 h for 3 seeds: see the README


def _info(res: Any) -> dict[str, Any]:
    """The JSON-sized part of a method's ``info`` (numbers, strings, small dicts)."""
    keep = ("budget", "flops_kept", "params_kept", "removed", "fused", "dropped", "scores", "ranks", "rule", "mode",
            "decompose", "last_projection_ranks", "departures")
    out = {k: v for k, v in res.info.items() if k in keep}
    return json.loads(json.dumps(out, default=str))


def row_svd(mode: str, allocation: str = "weights") -> mb.Row:
    """Post-hoc SVD in ``mode`` (``channel`` / ``spatial``), ranks allocated to the FLOPs target
    by ``allocation``: ``"weights"`` (data-free: discarded singular-value energy per FLOP) or
    ``"table"`` (the output error of each layer at each rank on the calibration batches)."""
    def run(ctx: mb.Ctx) -> tuple[nn.Module, dict[str, Any]]:
        data = {"loader": ctx.calib, "batches": len(ctx.calib)} if allocation != "weights" else {}
        res = pk_methods.get("svd")(ctx.base, ctx.data.x, mode=mode, target_flops=ctx.target, ignore=[mb.CLASSIFIER],
                                    allocation=allocation, **data)
        return res.model, _info(res)
    return run


def _trains(name: str, **options: Any) -> mb.Row:
    """A training method on the training split for the fine-tune's epochs, with its schedule
    (so its own training equals the fine-tune in steps), to the FLOPs target."""
    def run(ctx: mb.Ctx) -> tuple[nn.Module, dict[str, Any]]:
        cfg = mb.finetune_config(ctx)
        res = pk_methods.get(name)(ctx.base, ctx.data.x, loader=ctx.data.train_loader(ctx.seed + 500), epochs=cfg.epochs,
                                   train_config=cfg, target_flops=ctx.target, ignore=[mb.CLASSIFIER], **options)
        return res.model, {**_info(res), "train_steps": ctx.ft_steps}
    return run


def row_block_drop(ctx: mb.Ctx) -> tuple[nn.Module, dict[str, Any]]:
    """Residual branches dropped by their output norm on the calibration batches."""
    res = pk_methods.get("block_drop")(ctx.base, ctx.data.x, loader=ctx.calib, batches=len(ctx.calib),
                                       criterion="norm", target_flops=ctx.target, ignore=[mb.CLASSIFIER])
    return res.model, _info(res)


ROWS: dict[str, mb.Row] = {
    "trp": _trains("trp", mode="channel"),
    "svd:channel": row_svd("channel"),
    "svd:spatial": row_svd("spatial"),
    "svd:channel+table": row_svd("channel", "table"),
    "svd:spatial+table": row_svd("spatial", "table"),
    "cap": mb.row_method("cap"),
    "criterion:l2": mb.row_criterion("l2"),
    "resconv": _trains("resconv"),
    "block_drop": row_block_drop,
    "trp:spatial": _trains("trp", mode="spatial"),
}
DEFAULT_ROWS = ["trp", "svd:channel", "svd:spatial", "svd:channel+table", "svd:spatial+table", "cap", "criterion:l2", "resconv", "block_drop"]
TABLES = {"Rank: TRP against post-hoc SVD and channel pruning": ["trp", "trp:spatial", "svd:channel", "svd:spatial",
                                                                 "svd:channel+table", "svd:spatial+table", "cap",
                                                                 "criterion:l2"],
          "Depth against width: layer and block removal against channel pruning": ["resconv", "block_drop",
                                                                                    "criterion:l2"]}


def latency(model: nn.Module, data: mb.Data, args: argparse.Namespace, prefix: str = "") -> dict[str, float]:
    """Median CPU latency (ms) of ``model`` at the batch sizes of :data:`LATENCY_BATCHES`, keyed
    ``{prefix}latency_b{B}_ms``."""
    out = {}
    for b in LATENCY_BATCHES:
        x = data.x.expand(b, *data.x.shape[1:]).contiguous()
        out[f"{prefix}latency_b{b}_ms"] = measure_latency(model, x, threads=args.threads,
                                                           min_run_time=args.latency_time).median_ms
    return out


def _kept(run: dict[str, Any], b: int) -> float:
    """A run's latency at batch ``b`` over the baseline's timed beside it."""
    return run[f"latency_b{b}_ms"] / run[f"base_latency_b{b}_ms"]


def _mean(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.3g}" if vals else "-"


def report(results: dict[str, Any], path: Path) -> None:
    """Write the Markdown tables of ``results``."""
    cfg = results["config"]
    lines = ["# Rank and depth against width at equal FLOPs: trained ResNet-20, Fashion-MNIST and CIFAR-10 (partial)",
             "", machine_line(results["machine"]), "",
             f"Target: keep {cfg['target_flops']:.0%} of the FLOPs (classifier kept). Fine-tune, the same for every "
             "row (that of `benchmarks/methods.py`): SGD momentum 0.9, cosine from the LR to 0, weight decay 5e-4, "
             "batch 128, augmentation, epochs: " + ", ".join(f"{v} on {k}" for k, v in cfg["ft_epochs"].items())
             + f"; `trp` and `resconv` also train that long while pruning. Latency: "
             f"`measure_latency` median, threads {cfg['threads']}, batch 1 and 16, eval mode; *lat. kept* = the mean over "
             "the seeds of latency over the baseline's, timed right after each pruned model. Accuracy: full test splits; mean ± half-width of the 95% t-interval over the seeds.", ""]
    for ds in mb.DATASETS:
        base = results.get("baselines", {}).get(ds)
        if base is None:
            continue
        lines += [f"## {ds}", "",
                  f"Baseline: test top-1 {base['top1'] * 100:.2f}%, {base['params'] / 1e3:.1f}K params, "
                  f"{base['flops'] / 1e6:.2f} MFLOPs, latency {base.get('latency_b1_ms', float('nan')):.2f} ms (b1) / "
                  f"{base.get('latency_b16_ms', float('nan')):.2f} ms (b16). Fine-tune LR {cfg['ft_lr'].get(ds)} "
                  f"({cfg.get('lr_source', {}).get(ds, '?')}); {results.get('ft_steps', {}).get(ds, '?')} fine-tune "
                  "steps.", ""]
        for title, rows in TABLES.items():
            body = []
            for row in rows:
                runs = [r for r in results["runs"].values() if r["dataset"] == ds and r["row"] == row
                        and r["status"] == "ok" and r.get("ft_lr") == cfg["ft_lr"].get(ds)]
                fails = [r for r in results["runs"].values() if r["dataset"] == ds and r["row"] == row
                         and r["status"] != "ok"]
                if not runs:
                    if fails:
                        body.append([row, "FAIL: " + fails[0].get("error", "?")[:90]] + [""] * 9)
                    continue
                lat = {b: [r[f"latency_b{b}_ms"] for r in runs] for b in LATENCY_BATCHES}
                body.append([row, mb.interval([r["top1_no_ft"] for r in runs]), mb.interval([r["top1_ft"] for r in runs]),
                             f"{statistics.mean(r['flops'] for r in runs) / base['flops']:.3f}",
                             f"{statistics.mean(r['params'] for r in runs) / base['params']:.3f}",
                             *[f"{_mean(lat[b])} ({statistics.mean(_kept(r, b) for r in runs):.2f})"
                               for b in LATENCY_BATCHES],
                             f"{statistics.mean(r['prune_s'] for r in runs):.1f}",
                             f"{statistics.mean(r['finetune_s'] for r in runs):.0f}", len(runs)])
            if body:
                lines += [f"### {title}", "",
                          md_table(["row", "top-1 % no FT", "top-1 % FT", "FLOPs kept", "params kept",
                                    "ms b1 (lat. kept)", "ms b16 (lat. kept)", "prune s", "fine-tune s", "seeds"], body),
                          ""]
    lines += ["Columns: *FLOPs kept* and *params kept* are means over the seeds (`count_flops` / `count_params`); unit "
              "budgets (`resconv`, `block_drop`) keep at most the target, as close as whole layers/blocks allow; "
              "*prune s* includes `trp`'s and `resconv`'s training; latency is measured on a shared 2-core CPU and "
              "only comparable within one run (the load average of each run is in the JSON).", ""]
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: those of ``methods.py`` plus the LR source and the latency time."""
    p = mb.common_parser(__doc__.split("\n\n")[0], list(ROWS), TARGET, RESULTS_DIR / "rank_depth.json")
    p.set_defaults(rows=",".join(DEFAULT_ROWS), ft_epochs=DEFAULT_FT_EPOCHS)
    p.add_argument("--lr-from", default=str(RESULTS_DIR / "methods.json"),
                   help="results JSON of methods.py whose tuned fine-tune LR to use (when its grid is complete)")
    p.add_argument("--latency-time", type=float, default=1.0, help="seconds of timing per latency measurement")
    return mb.finish_args(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    results_path, results, datasets, rows, seeds = mb.begin(args, ROWS, {
        "target_flops": args.target_flops, "calib_batches": args.calib_batches, "ft_epochs": args.ft_epochs,
        "threads": args.threads, "latency_time": args.latency_time, "max_steps": args.max_steps})
    md = results_path.with_suffix(".md")
    if args.report_only:
        report(results, md)
        return 0
    torch.set_num_threads(args.threads)
    loaded = mb.load_all(args, datasets, results)
    for ds, (base, data) in loaded.items():
        results["baselines"][ds].update(latency(base, data, args))
    mb.set_lrs(args, loaded, results)
    write_json(results_path, results)

    def measure(model: nn.Module, data: mb.Data) -> dict[str, Any]:
        # The baseline is timed again beside each pruned model: the load of a shared machine
        # drifts over hours, and the ratio of two timings taken together drifts less.
        return {**latency(model, data, args), **latency(loaded[data.name][0], data, args, "base_")}

    mb.run_grid(args, results, loaded, rows, seeds, results_path, lambda: report(results, md), ROWS, measure)
    report(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
