"""Do training-free proxies rank architectures? Issue #13's pruning-at-initialisation study.

Sub-architectures of an untrained ResNet-20 (Fashion-MNIST input, seeded init) are sampled by
keeping a random fraction (uniform in [0.25, 1]) of every prunable group's channels
(``pk.prune(group_ratios=...)``, classifier kept). Each one is scored at initialisation by
:func:`prunekit.methods.pai.architecture_scores` (the sums of SNIP, GraSP and SynFlow
saliencies, and the log path norm, a FreeFlow-like data- and label-free proxy) on one batch of
64 training images, and by its parameter and FLOP counts (the baselines zero-cost proxies are
usually compared with). Then it is trained from scratch, briefly and identically for all
(``--epochs`` over ``--train-images`` class-balanced training images, SGD momentum 0.9, LR 0.1
cosine, weight decay 5e-4, batch 128, augmentation) and evaluated on the validation split held
out of the training data (5,000 images). The report gives each proxy's Spearman rank correlation
with that accuracy (and a bootstrap 95% interval over the architectures) and the seconds the
scoring takes, the quantity these proxies are about.

Results go to ``results/pai_proxies.json`` after every architecture; a rerun resumes.

Usage::

    python benchmarks/pai_proxies.py --fashion-mnist /usr/share/datasets/fashion-mnist      # 24 archs
    python benchmarks/pai_proxies.py --fashion-mnist PATH --archs 4 --train-images 1000 --out /tmp/p.json  # smoke
    python benchmarks/pai_proxies.py --report-only
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, machine_line, md_table, read_json, write_json  # noqa: E402

log = logging.getLogger("pai_proxies")
PROXIES = ("snip", "grasp", "synflow", "pathnorm", "params", "flops")
VAL_SIZE = 5000
BATCH = 128


def sample_architecture(base: torch.nn.Module, x: torch.Tensor, index: int, seed: int) -> torch.nn.Module:
    """Architecture ``index``: every prunable group of ``base`` keeps a fraction drawn
    uniformly from [0.25, 1] (``seed`` and ``index`` fix the draw); the weights are the
    (untrained) initial ones of the kept channels."""
    import prunekit as pk

    graph = pk.trace(base, x, ignore=["fc"])
    rng = np.random.default_rng([seed, index])
    ratios = {g.index: float(1.0 - rng.uniform(0.25, 1.0)) for g in graph.groups if g.n_prunable}
    return pk.prune(base, x, graph=graph, group_ratios=ratios, criterion="l2")


def run_one(index: int, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """Score architecture ``index`` at initialisation, train it briefly, evaluate it."""
    from prunekit.measure import count_flops, count_params
    from prunekit.methods.pai import architecture_scores
    from prunekit.recover import TrainConfig, evaluate, train
    from prunekit.zoo import create_model

    torch.manual_seed(args.seed)
    base = create_model("resnet20", in_chans=1, num_classes=10).eval()
    model = sample_architecture(base, data["x"], index, args.seed)
    rec: dict[str, Any] = {"index": index, "params": count_params(model), "flops": count_flops(model, data["x"]),
                           "widths": [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]}
    rec.update(architecture_scores(model, data["calib"]))
    cfg = TrainConfig(epochs=args.epochs, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                      tensorboard=False, seed=args.seed)
    t0 = time.perf_counter()
    train(model, data["train"], cfg, progress=False)
    rec["train_seconds"] = time.perf_counter() - t0
    rec["val_top1"] = 100.0 * float(evaluate(model, data["val"], topk=(1,))["top1"])
    return rec


def spearman(a: list[float], b: list[float], seed: int = 0, boot: int = 2000) -> dict[str, float]:
    """Spearman's rho of ``a`` and ``b`` (scipy), its p-value and a percentile bootstrap 95%
    interval over the pairs (resampled ``boot`` times with ``seed``)."""
    from scipy.stats import spearmanr

    rho, p = spearmanr(a, b)
    rng = np.random.default_rng(seed)
    a_, b_ = np.asarray(a), np.asarray(b)
    draws = []
    for _ in range(boot):
        i = rng.integers(0, len(a_), len(a_))
        if len(set(a_[i])) > 1 and len(set(b_[i])) > 1:
            draws.append(spearmanr(a_[i], b_[i])[0])
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return {"rho": float(rho), "p": float(p), "lo": float(lo), "hi": float(hi)}


def write_report(results: dict[str, Any], path: Path) -> None:
    """The Markdown report: setup, one row per proxy (rho, interval, p, scoring time), the archs."""
    archs = sorted(results["archs"].values(), key=lambda r: r["index"])
    cfg = results["config"]
    lines = ["# Training-free proxies against trained accuracy: ResNet-20 sub-architectures, Fashion-MNIST", "",
             machine_line(results["machine"]), "",
             f"{len(archs)} architectures (every group keeps U[0.25, 1] of its channels, untrained weights); scores "
             f"on one batch of 64 training images; each trained from scratch for {cfg['epochs']} epoch(s) on "
             f"{cfg['train_images']} training images (SGD 0.1 cosine, momentum 0.9, wd 5e-4, batch {BATCH}), "
             f"accuracy on the {VAL_SIZE}-image validation split held out of the training data. Spearman's rho "
             "with a percentile-bootstrap 95% interval over the architectures. See the script's docstring.", ""]
    if len(archs) >= 3:
        acc = [r["val_top1"] for r in archs]
        rows = []
        for name in PROXIES:
            s = spearman([r[name] for r in archs], acc)
            t = [r[f"{name}_seconds"] for r in archs if f"{name}_seconds" in r]
            rows.append([name, s["rho"], f"[{s['lo']:.2f}, {s['hi']:.2f}]", s["p"],
                         float(np.median(t)) if t else None])
        lines += [md_table(["proxy", "Spearman rho", "95% interval", "p", "median scoring s"], rows), ""]
        train_s = [r["train_seconds"] for r in archs]
        lines.append(f"Accuracy range {min(acc):.2f}-{max(acc):.2f}%; training took a median {np.median(train_s):.0f} s "
                     "per architecture (1 thread).")
        lines.append("")
    lines += [md_table(["arch", "params", "MFLOPs", "val top-1 %", "snip", "grasp", "synflow (log10)", "log path norm",
                        "widths"],
                       [[r["index"], r["params"], r["flops"] / 1e6, r["val_top1"], r["snip"], r["grasp"], r["synflow"],
                         r["pathnorm"], " ".join(map(str, r["widths"]))] for r in archs]), ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the study and write the JSON and Markdown results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fashion-mnist", help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--archs", type=int, default=24, help="sub-architectures to sample (default 24)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per architecture (default 2)")
    p.add_argument("--train-images", type=int, default=15000, help="class-balanced training images (default 15000)")
    p.add_argument("--seed", type=int, default=0, help="init, sampling and training seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(RESULTS_DIR / "pai_proxies.json"), help="JSON results file")
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    config = {"epochs": args.epochs, "train_images": args.train_images, "seed": args.seed, "archs": args.archs}
    results = read_json(out, {"archs": {}, "config": config, "machine": machine_info()})
    if args.report_only:
        write_report(results, out.with_suffix(".md"))
        return 0
    if not args.fashion_mnist:
        p.error("--fashion-mnist PATH is needed (apt-get install dataset-fashion-mnist)")
    if results["config"] != config and results["archs"]:
        p.error(f"{out} holds a run with another configuration ({results['config']}); pass --out")
    torch.set_num_threads(args.threads)
    from prunekit.zoo import load_dataset, make_loader

    spec = f"fashion-mnist:{args.fashion_mnist}"
    train_info = load_dataset(spec, split="train", val_size=VAL_SIZE, subset=args.train_images, seed=args.seed)
    pool = load_dataset(spec, split="train", val_size=VAL_SIZE, augment=False, subset=64, seed=args.seed)
    val_info = load_dataset(spec, split="val", val_size=VAL_SIZE)
    calib = next(iter(make_loader(pool, batch_size=64, shuffle=False, seed=0)))
    data = {"x": torch.zeros(1, 1, train_info.image_size, train_info.image_size),
            "train": make_loader(train_info, batch_size=BATCH, shuffle=True, seed=args.seed),
            "val": make_loader(val_info, batch_size=256, shuffle=False, seed=0), "calib": [tuple(calib)]}
    for i in range(args.archs):
        if str(i) in results["archs"]:
            continue
        t0 = time.perf_counter()
        rec = run_one(i, args, data)
        results["archs"][str(i)] = rec
        results["machine"] = machine_info()
        write_json(out, results)
        write_report(results, out.with_suffix(".md"))
        log.info("arch %d: val %.2f%%, %.2f MFLOPs, synflow %.2f, pathnorm %.2f (%.0f s)", i, rec["val_top1"],
                 rec["flops"] / 1e6, rec["synflow"], rec["pathnorm"], time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
