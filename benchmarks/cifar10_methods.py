"""Every criterion and method of prunekit against Torch-Pruning's pruners, at equal FLOPs.

From one trained ResNet-20 per data set (``benchmarks/train_baselines.py`` writes them to
``runs/baselines/``), each row prunes to the same FLOPs target (default 50%), is evaluated
*without* fine-tuning, then fine-tuned under the same budget and seeds and evaluated again:

    python benchmarks/cifar10_methods.py                        # both data sets, 3 seeds
    python benchmarks/cifar10_methods.py --datasets cifar10-partial --rows cap,l2 --seeds 0
    python benchmarks/cifar10_methods.py --report-only          # rebuild the Markdown

Data: ``PRUNEKIT_FASHION_MNIST`` (IDX folder) and ``PRUNEKIT_CIFAR10_NPZ`` (the partial
CIFAR-10 npz), or ``--fashion-mnist`` / ``--cifar10-npz``. Finished (data set, row, seed)
runs are kept in the results JSON and skipped on a rerun, so an interrupted run resumes.

Rows: ``criterion:NAME`` are plain criterion pruning (no recovery before fine-tuning);
``channel_pruning``, ``cap``, ``ucp``, ``functionality`` are the methods of
:mod:`prunekit.methods`; ``l2+compensation`` and ``functionality+compensation`` add CaP's
closed-form compensation to those choices; ``tp:*`` are Torch-Pruning 1.x pruners, their ratio bisected to the
same FLOPs. Seeds change the calibration batches, the fine-tuning order and random scores.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit import methods  # noqa: E402
from prunekit.measure import count_flops, count_params, measure_latency  # noqa: E402
from prunekit.recover import TrainConfig, evaluate, train  # noqa: E402
from prunekit.recover.reconstruct import reconstruct  # noqa: E402
from prunekit.zoo import load_dataset, make_loader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, machine_line, md_table, write_json  # noqa: E402

log = logging.getLogger("cifar10_methods")
REPO = Path(__file__).resolve().parent.parent
DATASETS = ("fashion-mnist", "cifar10-partial")
ROWS = ("criterion:random", "criterion:l1", "criterion:l2", "criterion:fpgm", "criterion:bn", "criterion:taylor",
        "criterion:activation", "criterion:apoz", "channel_pruning", "cap", "ucp", "functionality",
        "tp:magnitude", "tp:taylor", "tp:group_norm", "l2+compensation", "functionality+compensation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--target-flops", type=float, default=0.5, help="fraction of FLOPs kept (default 0.5)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 64 training images")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-subset", type=int, default=2000, help="class-balanced training images to fine-tune on")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--test-subset", type=int, default=2000, help="class-balanced test images (0 = all)")
    p.add_argument("--ucp-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baselines", default=str(REPO / "runs" / "baselines"))
    p.add_argument("--fashion-mnist", default=os.environ.get("PRUNEKIT_FASHION_MNIST"))
    p.add_argument("--cifar10-npz", default=os.environ.get("PRUNEKIT_CIFAR10_NPZ"))
    p.add_argument("--results", default=str(RESULTS_DIR / "cifar10_methods.json"))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def data_spec(name: str, args: argparse.Namespace) -> str | None:
    if name == "fashion-mnist":
        return f"fashion-mnist:{args.fashion_mnist}" if args.fashion_mnist else None
    return f"cifar10:{args.cifar10_npz}" if args.cifar10_npz else None


# --------------------------------------------------------------------------- Torch-Pruning rows


def tp_prune(model: nn.Module, x: torch.Tensor, kind: str, calib: list[tuple[torch.Tensor, torch.Tensor]],
             target: float) -> nn.Module:
    """Torch-Pruning's pruner ``kind`` with its global ratio bisected to ``target`` FLOPs."""
    import torch_pruning as tp

    base = count_flops(model, x)

    def run(ratio: float) -> nn.Module:
        m = copy.deepcopy(model).eval()
        fc = m.fc
        if kind == "magnitude":
            imp, cls = tp.importance.MagnitudeImportance(p=1), tp.pruner.MagnitudePruner
        elif kind == "taylor":
            imp, cls = tp.importance.TaylorImportance(), tp.pruner.MetaPruner
        else:
            imp, cls = tp.importance.GroupMagnitudeImportance(p=2), tp.pruner.GroupNormPruner
        pruner = cls(m, x, importance=imp, pruning_ratio=ratio, ignored_layers=[fc])
        if kind == "taylor":
            m.zero_grad()
            for xb, yb in calib:
                nn.functional.cross_entropy(m(xb), yb).backward()
        pruner.step()
        m.zero_grad(set_to_none=True)
        return m

    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        m = run(mid)
        if count_flops(m, x) / base > target:
            lo = mid
        else:
            hi, best = mid, m
    return best if best is not None else run(hi)


# --------------------------------------------------------------------------- one run


def prune_row(row: str, model: nn.Module, x: torch.Tensor, calib: list[Any], args: argparse.Namespace,
              seed: int) -> nn.Module:
    if row.startswith("tp:"):
        return tp_prune(model, x, row[3:], calib, args.target_flops)
    if row == "l2+compensation":  # plain L2 choice, then CaP's closed-form compensation: isolates its effect
        small, plan = pk.prune(model, x, criterion="l2", target_flops=args.target_flops, ignore=["fc"], return_plan=True)
        reconstruct(small, model, plan, calib, mode="oneshot", seed=seed)
        return small
    if row == "functionality+compensation":
        return methods.get("functionality")(model, x, loader=calib, batches=len(calib), target_flops=args.target_flops,
                                            ignore=["fc"], seed=seed, compensate=True).model
    kw: dict[str, Any] = {"loader": calib, "batches": len(calib), "target_flops": args.target_flops, "ignore": ["fc"]}
    if row in ("cap", "channel_pruning", "functionality", "ucp"):
        kw["seed"] = seed
    if row == "ucp":
        kw["steps"] = args.ucp_steps
    if row == "criterion:random":
        return pk.prune(model, x, criterion="random", criterion_kwargs={"seed": seed}, target_flops=args.target_flops,
                        ignore=["fc"])
    return methods.get(row)(model, x, **kw).model


def run_one(ds: str, row: str, seed: int, base: nn.Module, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    x = data["x"]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data["calib_pool"]), generator=g)[: args.calib_batches * 64]
    calib = [data["calib_pool"][int(i)] for i in idx]
    calib_batches = [(torch.stack([c[0] for c in calib[i:i + 64]]), torch.tensor([c[1] for c in calib[i:i + 64]]))
                     for i in range(0, len(calib), 64)]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    small = prune_row(row, base, x, calib_batches, args, seed).eval()
    prune_s = time.perf_counter() - t0
    acc0 = evaluate(small, data["test"], topk=(1,))["top1"]
    cfg = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, schedule="cosine", batch_size=64, seed=seed,
                      weight_decay=5e-4)
    loader = make_loader(data["ft"], batch_size=64, shuffle=True, seed=seed)
    res = train(small, loader, cfg, progress=False)
    acc1 = evaluate(small.eval(), data["test"], topk=(1,))["top1"]
    lat = measure_latency(small, x, threads=args.threads, min_run_time=0.3).median_ms
    return {"dataset": ds, "row": row, "seed": seed, "status": "ok", "top1_no_ft": acc0, "top1_ft": acc1,
            "params": count_params(small), "flops": count_flops(small, x), "latency_ms": lat,
            "prune_s": prune_s, "finetune_s": res.wall_time_s}


def load_data(ds: str, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    train_info = load_dataset(spec, split="train", augment=False, seed=0)
    ft_info = load_dataset(spec, split="train", augment=True, subset=args.finetune_subset or None, seed=0)
    test_info = load_dataset(spec, split="test", augment=False, seed=0)
    if args.test_subset and len(test_info) > args.test_subset:  # the partial CIFAR-10 has only 1,017
        test_info = load_dataset(spec, split="test", augment=False, subset=args.test_subset, seed=0)
    x = torch.zeros(1, train_info.in_chans, train_info.image_size, train_info.image_size)
    # A pool of calibration images (a fixed random 2,048 of the training split), sampled per seed.
    g = torch.Generator().manual_seed(1234)
    pool_idx = torch.randperm(len(train_info), generator=g)[:2048]
    pool = [train_info.dataset[int(i)] for i in pool_idx]
    return {"x": x, "ft": ft_info, "calib_pool": pool,
            "test": make_loader(test_info, batch_size=256, shuffle=False, seed=0)}


# --------------------------------------------------------------------------- report


def mean_std(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = statistics.mean(vals) * 100
    s = statistics.stdev(vals) * 100 if len(vals) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def report(results: dict[str, Any], path: Path) -> None:
    lines = ["# Pruning methods at equal FLOPs: ResNet-20 on Fashion-MNIST and CIFAR-10 (partial)", "",
             machine_line(results["machine"]), ""]
    cfg = results["config"]
    lines += [f"Target: keep {cfg['target_flops']:.0%} of the FLOPs; classifier kept whole. Calibration: "
              f"{cfg['calib_batches']} batches of 64 training images per seed. Fine-tuning (same for every row): "
              f"{cfg['finetune_epochs']} epoch(s) over a class-balanced {cfg['finetune_subset']}-image training "
              f"subset, SGD lr {cfg['finetune_lr']} cosine, batch 64, augmentation on. Test: class-balanced "
              f"{cfg['test_subset'] or 'all'} test images at most (CIFAR-10 partial has 1,017, all used). Seeds: {cfg['seeds']}. {cfg['threads']} torch thread(s); "
              "latency = batch-1 median on this CPU.", ""]
    for ds in cfg["datasets"]:
        base = results.get("baselines", {}).get(ds)
        if base is None:
            continue
        lines += [f"## {ds}", "", f"Baseline: top-1 {base['top1'] * 100:.2f}% on the same test images, "
                  f"{base['params'] / 1e3:.1f}K params, {base['flops'] / 1e6:.2f} MFLOPs, {base['latency_ms']:.3f} ms.", ""]
        rows = []
        for row in cfg["rows"]:
            runs = [r for r in results["runs"].values() if r["dataset"] == ds and r["row"] == row and r["status"] == "ok"]
            fails = [r for r in results["runs"].values() if r["dataset"] == ds and r["row"] == row and r["status"] != "ok"]
            if not runs:
                if fails:
                    rows.append([row, "FAIL: " + fails[0].get("error", "?")[:80], "", "", "", "", "", "", ""])
                continue
            rows.append([row, mean_std([r["top1_no_ft"] for r in runs]), mean_std([r["top1_ft"] for r in runs]),
                         f"{statistics.mean(r['params'] for r in runs) / base['params']:.3f}",
                         f"{statistics.mean(r['flops'] for r in runs) / base['flops']:.3f}",
                         f"{statistics.mean(r['latency_ms'] for r in runs) / base['latency_ms']:.3f}",
                         f"{statistics.mean(r['prune_s'] for r in runs):.1f}",
                         f"{statistics.mean(r['finetune_s'] for r in runs):.1f}", len(runs)])
        lines += [md_table(["row", "top-1 % no fine-tune", "top-1 % fine-tuned", "params ×", "FLOPs ×", "latency ×",
                            "prune s", "fine-tune s", "seeds"], rows), ""]
    lines += ["Columns: mean ± std over seeds; ratios are pruned / baseline. *prune s* includes scoring, "
              "calibration passes and (for the methods) reconstruction; Torch-Pruning's includes its ratio "
              "bisection to the FLOPs target (about 12 prunes). *latency ×* divides by the baseline latency of the last "
              "invocation on a shared 2-core machine with other jobs running: treat it as indicative only (the "
              "`speedup.py` benchmark measures latency properly).", ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results_path = Path(args.results)
    results: dict[str, Any] = {"runs": {}, "baselines": {}}
    if results_path.exists():
        import json

        results = json.loads(results_path.read_text())
    datasets = [d for d in args.datasets.split(",") if d]
    rows = [r for r in args.rows.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    results["config"] = {"target_flops": args.target_flops, "calib_batches": args.calib_batches,
                         "finetune_epochs": args.finetune_epochs, "finetune_subset": args.finetune_subset,
                         "finetune_lr": args.finetune_lr, "test_subset": args.test_subset, "threads": args.threads,
                         "datasets": sorted(set(results.get("config", {}).get("datasets", [])) | set(datasets)),
                         "rows": [r for r in ROWS if r in set(results.get("config", {}).get("rows", [])) | set(rows)],
                         "seeds": sorted(set(results.get("config", {}).get("seeds", [])) | set(seeds))}
    results["machine"] = machine_info()
    md = results_path.with_suffix(".md")
    if args.report_only:
        report(results, md)
        return 0
    torch.set_num_threads(args.threads)
    for ds in datasets:
        spec = data_spec(ds, args)
        base_dir = Path(args.baselines) / ds
        if spec is None or not base_dir.exists():
            log.warning("%s: skipped (data set path or baseline %s missing; run benchmarks/train_baselines.py)", ds, base_dir)
            continue
        data = load_data(ds, spec, args)
        base = pk.load(base_dir).eval()
        results["baselines"][ds] = {"top1": evaluate(base, data["test"], topk=(1,))["top1"],
                                    "params": count_params(base), "flops": count_flops(base, data["x"]),
                                    "latency_ms": measure_latency(base, data["x"], threads=args.threads,
                                                                  min_run_time=0.3).median_ms}
        for seed in seeds:
            for row in rows:
                key = f"{ds}/{row}/{seed}"
                if results["runs"].get(key, {}).get("status") == "ok":
                    continue
                log.info("%s ...", key)
                try:
                    rec = run_one(ds, row, seed, base, data, args)
                except Exception as exc:  # noqa: BLE001 - a failing row is a result too
                    log.exception("%s failed", key)
                    rec = {"dataset": ds, "row": row, "seed": seed, "status": "fail",
                           "error": f"{type(exc).__name__}: {exc}"}
                results["runs"][key] = rec
                log.info("%s: %s", key, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                                          if k in ("top1_no_ft", "top1_ft", "prune_s", "status")})
                write_json(results_path, results)
                report(results, md)
    write_json(results_path, results)
    report(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
