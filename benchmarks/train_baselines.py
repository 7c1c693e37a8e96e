"""Train the CIFAR ResNet-20 baselines that the pruning benchmarks start from.

Two real data sets, one fixed schedule each (SGD momentum 0.9, lr 0.1 cosine to 0,
weight decay 5e-4, batch 128, no label smoothing, seed 0):

* ``fashion-mnist``: the original IDX files (Debian package ``dataset-fashion-mnist``),
  ResNet-20 with a 1-channel stem, 28x28 input, random-crop augmentation (no flips), 15 epochs
  on the 55,000 training images left after holding out 5,000 for validation; tested on all
  10,000 test images.
* ``cifar10-partial``: the 5,169 train / 1,017 test real CIFAR-10 images of
  ``cifar10-partial.npz`` (500 held out for validation), 3-channel stem, crop + flip
  augmentation, 80 epochs.

``--resume`` continues an interrupted training from its per-epoch checkpoint; the results of a
data set not named in ``--datasets`` are kept in the results file.

Per data set the script records epochs, train/test examples, test top-1/top-5, final train
loss, wall time, training images/s, inference images/s (``measure_latency`` at batch 1 and
256, and ``evaluate``'s figure over the test loader), parameters and FLOPs, then saves the
weights with ``prunekit.save(model, PruningPlan(), DIR, model_spec="resnet20", ...)``
so ``prunekit.load(DIR)`` rebuilds the trained baseline. A data set that is not found is
skipped with a note in the results.

Data locations are never hard-coded: ``--fashion-mnist DIR`` or ``$PRUNEKIT_FASHION_MNIST``
(otherwise prunekit's own default for the ``fashion-mnist`` spec, the Debian package's
folder), and ``--cifar10-npz FILE`` or ``$PRUNEKIT_CIFAR10_NPZ`` (otherwise skipped).

CPU threads: torch's OpenMP threads spin-wait between parallel regions by default; on a
shared 2-core machine that made 2 threads 3-5x *slower* than 1. The script therefore sets
``OMP_WAIT_POLICY=PASSIVE`` before importing torch unless the variable is already set
(``--omp-wait-policy`` changes it; the value used is recorded).

Usage::

    python benchmarks/train_baselines.py --datasets cifar10-partial --cifar10-npz ../shared/data/cifar10-partial.npz
    python benchmarks/train_baselines.py --datasets fashion-mnist --resume   # Debian package's folder
    # longer schedule on a GPU:
    python benchmarks/train_baselines.py --device cuda --epochs 100 \\
        --results benchmarks/results/train_baselines_gpu.json
"""

from __future__ import annotations

import argparse
import os
import sys

# Must happen before torch (libgomp) is loaded; see the module docstring.
_OMP_FLAG = "--omp-wait-policy"
if _OMP_FLAG in sys.argv[:-1]:
    os.environ["OMP_WAIT_POLICY"] = sys.argv[sys.argv.index(_OMP_FLAG) + 1]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import prunekit  # noqa: E402
from prunekit.measure import count_flops, count_params, measure_latency  # noqa: E402
from prunekit.plan import PruningPlan  # noqa: E402
from prunekit.recover import TrainConfig, evaluate, train  # noqa: E402
from prunekit.zoo import load_dataset, make_loader, resolve_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, machine_line, md_table, write_json  # noqa: E402

log = logging.getLogger("train_baselines")

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_SPEC = "resnet20"
DATASETS = ("fashion-mnist", "cifar10-partial")
# The committed baselines (issue #10): full Fashion-MNIST for 15 epochs (~50 min on 2 cores) and
# 80 epochs over the small CIFAR-10 set (~30 min). Both hold out a class-balanced validation
# split of the training images (zoo.VAL_SEED), on which every benchmark default is tuned.
DEFAULT_EPOCHS = {"fashion-mnist": 15, "cifar10-partial": 80}
DEFAULT_FMNIST_SUBSET = 0
DEFAULT_VAL = {"fashion-mnist": 5000, "cifar10-partial": 500}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {DATASETS}")
    p.add_argument("--fashion-mnist", default=os.environ.get("PRUNEKIT_FASHION_MNIST"), metavar="DIR",
                   help="folder with the Fashion-MNIST IDX files (default $PRUNEKIT_FASHION_MNIST, "
                        "else prunekit's default for the 'fashion-mnist' spec)")
    p.add_argument("--cifar10-npz", default=os.environ.get("PRUNEKIT_CIFAR10_NPZ"), metavar="FILE",
                   help="cifar10-partial.npz (default $PRUNEKIT_CIFAR10_NPZ; skipped when neither is given)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every data set (overrides the two below)")
    p.add_argument("--fmnist-epochs", type=int, default=DEFAULT_EPOCHS["fashion-mnist"])
    p.add_argument("--cifar-epochs", type=int, default=DEFAULT_EPOCHS["cifar10-partial"])
    p.add_argument("--fmnist-subset", type=int, default=DEFAULT_FMNIST_SUBSET,
                   help="class-balanced Fashion-MNIST training subset size; 0 = all 60,000")
    p.add_argument("--cifar-subset", type=int, default=0,
                   help="class-balanced CIFAR-10 training subset size, for smoke tests; 0 = all images (default)")
    p.add_argument("--fmnist-val", type=int, default=DEFAULT_VAL["fashion-mnist"],
                   help="Fashion-MNIST training images held out as the validation split")
    p.add_argument("--cifar-val", type=int, default=DEFAULT_VAL["cifar10-partial"],
                   help="CIFAR-10 training images held out as the validation split")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training from its checkpoint")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (training and timing)")
    p.add_argument(_OMP_FLAG, default=None, help="OMP_WAIT_POLICY for torch's OpenMP (default PASSIVE unless set)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast (CUDA only)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (the data sets are in memory)")
    p.add_argument("--latency-min-run-time", type=float, default=1.0, help="seconds of timed calls per batch size")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the trained models go, one sub-folder per data set (default REPO/benchmarks/baselines, "
                        "committed; training checkpoints stay in REPO/runs/baselines)")
    p.add_argument("--results", default=str(RESULTS_DIR / "train_baselines.json"), help="results JSON (the .md goes next to it)")
    p.add_argument("--report-only", action="store_true", help="rebuild the .md from the results JSON, train nothing")
    p.add_argument("--progress", action="store_true", help="show tqdm progress bars")
    return p.parse_args(argv)


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where unavailable."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dataset_spec(name: str, args: argparse.Namespace) -> tuple[str | None, str]:
    """Return (load_dataset spec or None when unavailable, where the data came from)."""
    if name == "fashion-mnist":
        if args.fashion_mnist:
            return f"fashion-mnist:{args.fashion_mnist}", "--fashion-mnist / $PRUNEKIT_FASHION_MNIST"
        return "fashion-mnist", "prunekit default for the 'fashion-mnist' spec"
    if args.cifar10_npz:
        return f"cifar10:{args.cifar10_npz}", "--cifar10-npz / $PRUNEKIT_CIFAR10_NPZ"
    return None, "neither --cifar10-npz nor $PRUNEKIT_CIFAR10_NPZ given"


def run_one(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train, measure and save the baseline of one data set; return its result record."""
    rec: dict[str, Any] = {"dataset": name, "model_spec": MODEL_SPEC, "loadavg_start": loadavg()}
    spec, source = dataset_spec(name, args)
    rec["data_source"] = source
    if spec is None:
        rec.update(status="skipped", note=f"data set not given: {source}")
        return rec
    rec["data_spec"] = spec
    if name == "fashion-mnist":
        epochs = args.epochs if args.epochs is not None else args.fmnist_epochs
        subset = args.fmnist_subset or None
        val_size = args.fmnist_val
    else:
        epochs = args.epochs if args.epochs is not None else args.cifar_epochs
        subset = args.cifar_subset or None  # default: the partial CIFAR-10 is small, use every image
        val_size = args.cifar_val
    try:
        train_info = load_dataset(spec, split="train", subset=subset, seed=args.seed, val_size=val_size)
        val_info = load_dataset(spec, split="val", val_size=val_size) if val_size else None
        test_info = load_dataset(spec, split="test")
    except (FileNotFoundError, ValueError) as exc:
        rec.update(status="skipped", note=f"data set not found: {exc}")
        return rec

    c, s = train_info.in_chans, train_info.image_size
    rec.update(
        status="ok", epochs=epochs, in_chans=c, image_size=s, num_classes=train_info.num_classes,
        train_examples=len(train_info), test_examples=len(test_info), val_examples=val_size,
        train_subset=f"class-balanced subset of the training split (seed {args.seed})" if subset else "all",
    )
    cfg = TrainConfig(
        epochs=epochs, lr=args.lr, optimizer="sgd", momentum=0.9, weight_decay=args.weight_decay, schedule="cosine",
        label_smoothing=0.0, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, seed=args.seed,
        amp=args.amp, tensorboard=False,
    )
    rec["train_config"] = cfg.to_dict()
    torch.manual_seed(args.seed)
    model = resolve_model(MODEL_SPEC, num_classes=train_info.num_classes, in_chans=c).to(device)
    x1 = torch.zeros(1, c, s, s, device=device)
    rec["params"] = count_params(model)
    rec["flops"] = count_flops(model, x1)

    train_loader = make_loader(train_info, batch_size=args.batch_size, shuffle=True, seed=args.seed,
                               num_workers=args.workers, drop_last=False)
    test_loader = make_loader(test_info, batch_size=256, shuffle=False, seed=args.seed, num_workers=args.workers)
    # Checkpoints go to runs/ (ignored by git); the trained model to --out (committed by default).
    run_dir = REPO_ROOT / "runs" / "baselines" / name
    out_dir = Path(args.out).expanduser() / name if args.out else REPO_ROOT / "benchmarks" / "baselines" / name
    log.info("%s: %d train / %d test images, %dx%dx%d, %d epochs -> %s", name, len(train_info), len(test_info),
             c, s, s, epochs, out_dir)

    t0 = time.perf_counter()
    result = train(model, train_loader, cfg, run_dir=run_dir, resume=args.resume, progress=args.progress)
    rec["train_wall_s"] = result.wall_time_s
    rec["train_images_per_s"] = result.images_per_s
    rec["final_train_loss"] = result.final.get("train_loss")
    rec["final_train_acc"] = result.final.get("train_acc")
    rec["history"] = result.history

    if val_info is not None:
        vl = make_loader(val_info, batch_size=256, shuffle=False, seed=args.seed, num_workers=args.workers)
        rec["val_top1"] = evaluate(model, vl, device=device, amp=args.amp)["top1"]
    ev = evaluate(model, test_loader, device=device, amp=args.amp)
    rec.update(test_loss=ev["loss"], test_top1=ev["top1"], test_top5=ev["top5"], eval_images_per_s=ev["images_per_s"])
    log.info("%s: test top-1 %.4f top-5 %.4f (%.0f img/s)", name, ev["top1"], ev["top5"], ev["images_per_s"])

    for b in (1, 256):
        x = torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(0)).to(device)
        lat = measure_latency(model, x, threads=args.threads, min_run_time=args.latency_min_run_time)
        rec[f"latency_b{b}"] = lat.to_dict()
        rec[f"infer_images_per_s_b{b}"] = lat.throughput
        log.info("%s: batch %d median %.2f ms -> %.0f img/s", name, b, lat.median_ms, lat.throughput)

    model.eval()
    prunekit.save(model.cpu(), PruningPlan(), out_dir, model_spec=MODEL_SPEC,
                  extra={"num_classes": train_info.num_classes, "in_chans": c, "dataset": name, "data_spec": spec,
                         "test_top1": ev["top1"], "epochs": epochs, "seed": args.seed, "val_size": val_size})
    # Round trip: the saved directory must rebuild exactly this model.
    reloaded = prunekit.load(out_dir).eval()
    xb = next(iter(test_loader))[0][:16]
    with torch.no_grad():
        diff = float((reloaded(xb) - model(xb)).abs().max())
    model.to(device)
    rec["out_dir"] = os.path.relpath(out_dir, REPO_ROOT) if out_dir.is_relative_to(REPO_ROOT) else str(out_dir)
    rec["reload_max_abs_diff"] = diff
    rec["total_wall_s"] = time.perf_counter() - t0
    rec["loadavg_end"] = loadavg()
    return rec


ROW_HEADER = [
    "data set", "epochs", "train ex.", "val ex.", "test ex.", "val top-1 %", "test top-1 %", "test top-5 %", "final train loss",
    "train wall s", "train img/s", "infer img/s b1", "infer img/s b256", "eval img/s", "params", "MFLOPs",
    "load 1m start/end",
]


def write_markdown(path: Path, data: dict[str, Any]) -> None:
    """Write the results table and notes."""
    rows, notes = [], []
    for r in data["results"]:
        if r.get("status") != "ok":
            notes.append(f"- **{r['dataset']}: {r.get('status')}** — {r.get('note', '')}")
            continue
        la = f"{r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f}" if r.get("loadavg_end") else ""
        rows.append([
            r["dataset"], r["epochs"], r["train_examples"], r.get("val_examples", 0), r["test_examples"],
            100 * r["val_top1"] if "val_top1" in r else "", 100 * r["test_top1"], 100 * r["test_top5"],
            r["final_train_loss"], round(r["train_wall_s"], 1), r["train_images_per_s"], r["infer_images_per_s_b1"],
            r["infer_images_per_s_b256"], r["eval_images_per_s"], r["params"], r["flops"] / 1e6, la,
        ])
        if r.get("train_subset", "all") != "all":
            notes.append(f"- {r['dataset']}: trained on a {r['train_subset']}, {r['train_examples']} images; "
                         f"tested on the full test split ({r['test_examples']}).")
    m = data["machine"]
    cfg = data["args"]
    lines = [
        "# Baseline training: ResNet-20 (CIFAR variant) on real data",
        "",
        machine_line(m) + f" to {data.get('date_end')}; CPU `{m.get('cpu_model')}`; device {data['device']}, torch threads {cfg['threads']}, "
        f"OMP_WAIT_POLICY={data['omp_wait_policy']}; load average (1/5/15 min) at start {data['loadavg_start']}, "
        f"at end {data['loadavg_end']}; total wall time {data['total_wall_s']:.0f} s.",
        "",
        f"Schedule: SGD momentum 0.9, lr {cfg['lr']} cosine to 0, weight decay {cfg['weight_decay']}, batch "
        f"{cfg['batch_size']}, label smoothing 0, seed {cfg['seed']}; random-crop augmentation (plus horizontal flips "
        "for CIFAR-10). Model `resnet20` (option-B shortcuts), `in_chans` 1 for Fashion-MNIST. The training images "
        "exclude the validation split (*val ex.*: class-balanced, held out of the training files with the fixed "
        "`prunekit.zoo.data.VAL_SEED`), on which the pruning benchmarks tune; the test split is never used for tuning.",
        "",
        md_table(ROW_HEADER, rows) if rows else "(no data set was trained)",
        "",
        "Columns: accuracies on the test split (top-5 of 10 classes is a loose measure); *final train loss* is the mean "
        "cross-entropy over the last epoch (augmented images, weights changing during the epoch); *train img/s* is "
        "training images over training time (`TrainResult.images_per_s`); *infer img/s b1 / b256* are "
        "`measure_latency` medians (eval mode, no_grad) at batch 1 and 256; *eval img/s* is `evaluate` over the test "
        "loader (batch 256, includes normalising the images); FLOPs at batch 1 (`count_flops`, 2 per MAC).",
        "",
    ]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    saved = [f"- {r['dataset']}: `{r['out_dir']}` (reload max |diff| {r['reload_max_abs_diff']:.1e})"
             for r in data["results"] if r.get("status") == "ok"]
    if saved:
        lines += ["Saved models (`prunekit.load(DIR)` rebuilds them):", "", *saved, ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        raise SystemExit(f"unknown data sets {unknown}; choose from {DATASETS}")
    results_path = Path(args.results)
    md_path = results_path.with_suffix(".md")
    if args.report_only:
        write_markdown(md_path, json.loads(results_path.read_text()))
        print(md_path.read_text())
        return 0
    # Results of data sets not run now are kept, so the two trainings can run separately.
    previous = json.loads(results_path.read_text())["results"] if results_path.exists() else []
    data: dict[str, Any] = {
        "benchmark": "train_baselines", "machine": machine_info(), "device": str(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "args": vars(args),
        "loadavg_start": loadavg(), "results": [],
    }
    data["machine"]["cpu_model"] = cpu_model()
    if device.type == "cuda":
        data["machine"]["gpu"] = torch.cuda.get_device_name(device)
    start = time.perf_counter()
    for name in names:
        try:
            rec = run_one(name, args, device)
        except Exception as exc:  # keep the other data set's result
            log.exception("%s failed", name)
            rec = {"dataset": name, "status": "FAIL", "note": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
        if rec.get("status") != "ok":
            log.warning("%s: %s — %s", name, rec.get("status"), rec.get("note"))
        kept = [r for r in previous if r.get("dataset") not in names]
        data["results"] = [r for r in data["results"] if r["dataset"] != name] + [rec]
        data["results"] = kept + data["results"]
        data["loadavg_end"] = loadavg()
        data["total_wall_s"] = time.perf_counter() - start
        data["date_end"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_json(results_path, data)
        write_markdown(md_path, data)
    log.info("wrote %s and %s", results_path, md_path)
    print(md_path.read_text())
    return 0 if all(r.get("status") in ("ok", "skipped") for r in data["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
