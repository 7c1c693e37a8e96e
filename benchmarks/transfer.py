"""Does a searched sub-architecture transfer? Colombo & Gao's claim, at our scale (issue #11).

The architecture is found on the source task and *retrained from scratch* on a different, small
target task; the question is whether the searched widths beat widths chosen without a search at
the same FLOPs. Source: the trained Fashion-MNIST ResNet-20 (``benchmarks/baselines/fashion-mnist``).
Target: ``--target-images`` (default 300) class-balanced training images of scikit-learn's digits,
upsampled to 28x28, evaluated on the digits test split (360 images). Rows, all at ``--target-flops``
(default 0.5) of the source network's FLOPs (classifier kept):

* ``colombo_gao``: architecture variables searched for ``--search-epochs`` epochs of the full
  Fashion-MNIST training split (weights frozen), then extracted by the allocator;
* ``l2``: the same budget by L2 magnitude (uniform ratio, the allocator's default);
* ``random``: the same budget by random channel choice (seeded).

Every architecture gets its classifier re-created for 10 classes and every tensor re-initialised,
then trains ``--transfer-epochs`` epochs on the target images with
``prunekit.methods.colombo_gao.transfer_config`` (SGD, cosine, lr 0.05), seeds outermost; mean and
95% interval over the seeds. Resumable (``results/transfer.json``); ``--max-steps`` for smoke tests::

    python benchmarks/transfer.py
    python benchmarks/transfer.py --seeds 0 --search-epochs 1 --max-steps 2 --results /tmp/t.json   # smoke

Sizing: one search epoch (430 steps, frozen weights) per seed, about 5 minutes on this CPU, and
three short transfers per seed (seconds each): about 20 minutes for three seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods as protocol  # noqa: E402  (benchmarks/methods.py: data, intervals)
from common import RESULTS_DIR, machine_info, machine_line, md_table, write_json  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit import methods  # noqa: E402
from prunekit.measure import count_flops  # noqa: E402
from prunekit.methods import MethodResult  # noqa: E402
from prunekit.methods.colombo_gao import transfer, transfer_config  # noqa: E402
from prunekit.recover import evaluate  # noqa: E402
from prunekit.zoo import load_dataset, make_loader  # noqa: E402

log = logging.getLogger("transfer")
ROWS = ("colombo_gao", "l2", "random")


def source_architecture(row: str, base: torch.nn.Module, data: protocol.Data, seed: int,
                        args: argparse.Namespace) -> MethodResult:
    """The ``row``'s architecture of ``base`` at the FLOPs target (weights as it leaves them)."""
    budget = {"target_flops": args.target_flops, "ignore": [protocol.CLASSIFIER]}
    if row == "colombo_gao":
        cfg = transfer_config(args.search_epochs, reinit=False, seed=seed)
        if args.max_steps:
            cfg = dataclasses.replace(cfg, max_steps_per_epoch=args.max_steps)
        return methods.get("colombo_gao")(base, data.x, loader=data.train_loader(seed), epochs=args.search_epochs,
                                          train_config=cfg, seed=seed, **budget)
    small, plan = pk.prune(base, data.x, criterion=row, criterion_kwargs={"seed": seed} if row == "random" else None,
                           return_plan=True, **budget)
    return MethodResult(small, plan, {})


def run_one(row: str, seed: int, base: torch.nn.Module, data: protocol.Data, args: argparse.Namespace) -> dict[str, Any]:
    """Search (or choose) on the source, transfer to the digits, evaluate."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    res = source_architecture(row, base, data, seed, args)
    search_s = time.perf_counter() - t0
    target = load_dataset("digits", split="train", subset=args.target_images, image_size=28, seed=seed)
    test = load_dataset("digits", split="test", image_size=28)
    cfg = transfer_config(args.transfer_epochs, reinit=True, seed=seed)
    if args.max_steps:
        cfg = dataclasses.replace(cfg, max_steps_per_epoch=args.max_steps)
    t0 = time.perf_counter()
    moved = transfer(res, make_loader(target, batch_size=32, shuffle=True, seed=seed), args.transfer_epochs,
                     num_classes=10, reinit=True, train_config=cfg, seed=seed, head=protocol.CLASSIFIER)
    transfer_s = time.perf_counter() - t0
    top1 = evaluate(moved.model.eval(), make_loader(test, batch_size=256, shuffle=False, seed=0), topk=(1,))["top1"]
    return {"dataset": "fashion-mnist->digits", "row": row, "seed": seed, "status": "ok", "flops_kept": count_flops(res.model, data.x) / count_flops(base, data.x),
            "source_top1_no_ft": evaluate(res.model.eval(), data.test, topk=(1,))["top1"],
            "target_top1": top1, "search_s": search_s, "transfer_s": transfer_s,
            "target_images": len(target), "test_images": len(test)}


def report(results: dict[str, Any], path: Path) -> None:
    """The Markdown table of ``results``."""
    cfg = results["config"]
    rows = []
    for row in ROWS:
        runs = [r for r in results["runs"].values() if r["row"] == row and r["status"] == "ok"]
        if not runs:
            continue
        rows.append([row, protocol.interval([r["target_top1"] for r in runs]),
                     protocol.interval([r["source_top1_no_ft"] for r in runs]),
                     f"{statistics.mean(r['flops_kept'] for r in runs):.4f}",
                     f"{statistics.mean(r['search_s'] for r in runs):.0f}",
                     f"{statistics.mean(r['transfer_s'] for r in runs):.0f}", len(runs)])
    lines = ["# Transfer of a searched sub-architecture: Fashion-MNIST ResNet-20 -> scikit-learn digits", "",
             machine_line(results["machine"]), "",
             f"Budget: {cfg['target_flops']:.0%} of the FLOPs (classifier kept). Search: {cfg['search_epochs']} "
             f"epoch(s) of Fashion-MNIST. Target task: {cfg['target_images']} digits training images at 28x28, "
             f"{cfg['transfer_epochs']} epochs from re-initialised weights (SGD, cosine, lr 0.05); accuracy on the "
             "digits test split (360 images); mean ± 95% interval over the seeds.", "",
             md_table(["row", "digits top-1 %", "Fashion-MNIST top-1 % before retraining", "FLOPs kept",
                       "search s", "transfer s", "seeds"], rows), ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--target-flops", type=float, default=0.5)
    p.add_argument("--search-epochs", type=int, default=1)
    p.add_argument("--transfer-epochs", type=int, default=30)
    p.add_argument("--target-images", type=int, default=300)
    p.add_argument("--max-steps", type=int, default=None, help="cap every training phase's steps (smoke tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baselines", default=str(protocol.REPO / "benchmarks" / "baselines"))
    p.add_argument("--fashion-mnist", default=os.environ.get("PRUNEKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--results", default=str(RESULTS_DIR / "transfer.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    path = Path(args.results)
    results = protocol.load_results(path)
    results["machine"] = machine_info()
    results["config"] = {k: getattr(args, k) for k in ("target_flops", "search_epochs", "transfer_epochs",
                                                       "target_images", "max_steps")}
    data = protocol.load_data("fashion-mnist", f"fashion-mnist:{args.fashion_mnist}")
    base = pk.load(Path(args.baselines) / "fashion-mnist").eval()
    rows = [r for r in args.rows.split(",") if r]
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for row in rows:
            key = f"{row}/{seed}"
            if results["runs"].get(key, {}).get("status") == "ok":
                continue
            log.info("%s ...", key)
            try:
                rec = run_one(row, seed, base, data, args)
            except Exception as exc:  # noqa: BLE001 - a failing row is a result too
                log.exception("%s failed", key)
                rec = {"dataset": "fashion-mnist->digits", "row": row, "seed": seed, "status": "fail", "error": f"{type(exc).__name__}: {exc}"}
            results["runs"][key] = rec
            log.info("%s: %s", key, {k: v for k, v in rec.items() if k in ("target_top1", "search_s", "status")})
            write_json(path, results)
            report(results, path.with_suffix(".md"))
    report(results, path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
