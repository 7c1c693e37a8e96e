"""Pipeline sub-commands (demo, train, finetune, eval, export) of the ``prunekit`` CLI.

Options resolve in three layers: flags the user passed, then ``--recipe FILE`` (see
:mod:`prunekit.recipe`), then built-in defaults; that is why every recipe-backed flag has an
argparse default of None. ``add_commands`` also gives ``prune`` ``--recipe`` and
``--target-flops``. Only rank 0 writes files; every file is written atomically and nothing
already in ``--out`` is removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunekit.recipe import DEFAULTS, Recipe

# (flag, recipe key, type, help); type None means a --flag/--no-flag switch.
_DATA = [("--data", "data", str,
          "data set: digits, cifar10:PATH, cifar100:PATH, mnist:DIR, fashion-mnist[:DIR], npz:FILE, imagefolder:DIR"),
         ("--num-classes", "num_classes", int, "classifier outputs (default: the data set's)"),
         ("--in-chans", "in_chans", int, "input channels (default: the data set's)"),
         ("--image-size", "image_size", int, "resize images to this size (default: the data set's; digits: 16)"),
         ("--subset", "subset", int, "use a class-balanced subset of N images (of the training split; of --split for eval)"),
         ("--workers", "workers", int, "DataLoader worker processes"),
         ("--eval-batch-size", "eval_batch_size", int, "batch size for evaluation")]
_TRAIN = [("--epochs", "epochs", int, "training epochs"), ("--lr", "lr", float, "peak learning rate"),
          ("--optimizer", "optimizer", str, "sgd or adamw"), ("--momentum", "momentum", float, "SGD momentum"),
          ("--weight-decay", "weight_decay", float, "weight decay"),
          ("--schedule", "schedule", str, "learning-rate schedule: cosine, step or constant"),
          ("--milestones", "milestones", int, "epochs where the step schedule multiplies the LR by --gamma "
           "(default: 50%% and 75%% of the epochs)"),
          ("--gamma", "gamma", float, "LR factor at each step milestone"),
          ("--nesterov", "nesterov", None, "Nesterov momentum for SGD"),
          ("--warmup-epochs", "warmup_epochs", float, "linear warm-up epochs (fractions allowed)"),
          ("--label-smoothing", "label_smoothing", float, "label smoothing of the cross-entropy"),
          ("--batch-size", "batch_size", int, "training batch size (per process under torchrun)"),
          ("--seed", "seed", int, "seed of initialisation, data order and augmentation"),
          ("--augment", "augment", None, "random-crop (and flip) augmentation of the training images"),
          ("--tensorboard", "tensorboard", None, "also write TensorBoard logs under OUT/tb"),
          ("--amp", "amp", None, "mixed precision (bf16, else fp16) on CUDA"),
          ("--channels-last", "channels_last", None, "channels-last memory format on CUDA"),
          ("--grad-clip", "grad_clip", float, "clip the gradient norm to this value")]
_KD = [("--kd-alpha", "kd_alpha", float, "weight of the distillation term (0..1) when a teacher is used"),
       ("--kd-temperature", "kd_temperature", float, "distillation temperature")]
_PRUNE = [("--target-flops", "target_flops", float,
           "fraction of FLOPs to keep, e.g. 0.5 (ratio found by bisection; wins over --ratio)"),
          ("--target-params", "target_params", float, "fraction of parameters to keep, e.g. 0.5"),
          ("--target-latency", "target_latency", float,
           "fraction of the latency to keep, from a per-layer latency table measured on this machine"),
          ("--method", "method", str, "a published method instead of plain criterion pruning: channel_pruning "
           "(LASSO + least squares), cap (compensation, no fine-tuning), ucp, functionality, iterative"),
          ("--data", "data", str, "data set whose training split calibrates data-driven criteria and methods "
           "(digits, cifar10:PATH, fashion-mnist:PATH, ...)"),
          ("--calib-batches", "calib_batches", int, "calibration batches (training split) for data-driven "
           "criteria and methods"),
          ("--min-channels", "min_channels", int, "every group keeps at least this many channels")]
_NAMES = {"finetune_epochs": "--epochs", "finetune_lr": "--lr"}


def _add(p: argparse.ArgumentParser, table: list[tuple[str, str, Any, str]]) -> None:
    """Add recipe-backed options with default None (so recipe values are only overridden when passed)."""
    for flag, key, typ, text in table:
        text = _help(text, key)
        if typ is None:
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            many = "*" if isinstance(DEFAULTS[key], list) else None
            p.add_argument(flag, dest=key, type=typ, nargs=many, default=None, metavar=key.upper(), help=text)


def _help(text: str, key: str) -> str:
    """Help text plus the recipe key and (unless the text already says it) the built-in default."""
    default = DEFAULTS[key]
    shown = "" if default in (None, [], {}) or "default" in text else f"; default {default}"
    return f"{text} (recipe key {key}{shown})"


def _run_opts(p: argparse.ArgumentParser, *, out: str | None = None) -> None:
    """Options shared by the commands that write a run directory."""
    p.add_argument("--recipe", default=None, help="YAML recipe file or packaged recipe name (resnet20_cifar10, "
                   "resnet56_cifar10, vgg16_cifar10, mobilenetv2_cifar10, digits_demo); flags override it")
    p.add_argument("--out", default=out, required=out is None,
                   help="run directory (created; files in it are replaced atomically, none is deleted)"
                   + (f"; default {out}" if out else ""))
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for latency measurement (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bars")


def _err(message: str) -> Exception:
    """A ``CliError`` (exit status 2, one line); imported lazily because main.py imports this module."""
    from prunekit.cli.main import CliError

    return CliError(message)


def _recipe(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Recipe:
    """Resolve flags > --recipe > ``base`` > defaults into a checked Recipe (errors become CliError)."""
    from prunekit.recipe import load_recipe, resolve

    try:
        recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else None
        r, _ = resolve(vars(args), recipe, recipe_file=getattr(args, "recipe", None), flag_names=_NAMES, base=base)
    except (ValueError, FileNotFoundError) as exc:
        raise _err(str(exc)) from None
    return r


def _out(path: str | None) -> Path:
    from prunekit.recover import is_main_process

    out = Path(path or ".").expanduser()
    if out.exists() and not out.is_dir():
        raise _err(f"--out {path}: exists and is not a directory")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    return out


def _data(r: Recipe, split: str, subset: int | None = None) -> Any:
    """Load the recipe's data set split; a missing or placeholder path is a CliError naming --data."""
    from prunekit.zoo import load_dataset

    if not r.data:
        raise _err("no data set: pass --data SPEC (digits, cifar10:PATH, ...) or set data: in the recipe")
    name, _, path = r.data.partition(":")
    if path == "PATH":
        raise _err(f"--data {r.data}: the recipe's data path is a placeholder; pass --data {name}:/path/to/{name}")
    try:
        return load_dataset(r.data, split=split, augment=r.augment if split == "train" else False, subset=subset,
                            seed=r.seed, image_size=r.image_size)
    except (FileNotFoundError, ValueError) as exc:
        raise _err(f"--data {r.data}: {exc}") from None


def _model(spec: str, *, num_classes: int | None, in_chans: int | None, flag: str = "--model",
           weights: str | None = None) -> tuple[Any, Any]:
    """Return ``(model, plan)``: a saved directory via ``prunekit.load`` (plan from it) or a spec (plan None)."""
    import prunekit as pk
    from prunekit.persist import load_plan
    from prunekit.zoo import resolve_model

    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            return pk.load(path), load_plan(path)
        return resolve_model(spec, num_classes=num_classes, in_chans=in_chans, weights=weights), None
    except (KeyError, ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        raise _err(f"{flag} {spec}: {exc.args[0] if exc.args else exc}") from None


def _shape(r: Recipe, model: Any, spec: str, plan: Any, info: Any = None) -> tuple[int, ...]:
    """Example input shape: --input-shape, else the data set's, else the saved one, else the model's default."""
    from prunekit.cli.main import _input_shape

    if r.input_shape:
        return _input_shape(r.input_shape, model, spec)
    if info is not None:
        return (1, info.in_chans, info.image_size, info.image_size)
    if plan is not None and plan.meta.get("input_shape"):
        return tuple(plan.meta["input_shape"])
    shape = _input_shape(None, model, spec)
    return (shape[0], r.in_chans, *shape[2:]) if r.in_chans else shape


def _train_cfg(r: Recipe, *, finetune: bool) -> Any:
    from prunekit.recover import TrainConfig

    return TrainConfig(epochs=r.finetune_epochs if finetune else r.epochs, lr=r.finetune_lr if finetune else r.lr,
                       optimizer=r.optimizer, momentum=r.momentum, nesterov=r.nesterov, weight_decay=r.weight_decay,
                       schedule=r.schedule, milestones=tuple(r.milestones), gamma=r.gamma,
                       warmup_epochs=0.0 if finetune else r.warmup_epochs, label_smoothing=r.label_smoothing,
                       batch_size=r.batch_size, seed=r.seed, kd_alpha=r.kd_alpha, kd_temperature=r.kd_temperature,
                       tensorboard=r.tensorboard, amp=r.amp, channels_last=r.channels_last, grad_clip=r.grad_clip)


def _loaders(r: Recipe, train_info: Any, test_info: Any) -> tuple[Any, Any]:
    from prunekit.recover import is_distributed
    from prunekit.zoo import make_loader

    dist = is_distributed()
    return (make_loader(train_info, batch_size=r.batch_size, shuffle=True, seed=r.seed, num_workers=r.workers, distributed=dist),
            make_loader(test_info, batch_size=r.eval_batch_size, shuffle=False, seed=r.seed, num_workers=r.workers,
                        distributed=dist))


def _device() -> Any:
    import os

    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")


def _accuracy(model: Any, loader: Any) -> dict[str, float]:
    from prunekit.recover import evaluate

    m = evaluate(model, loader)
    return {k: m[k] for k in ("top1", "top5", "loss")}


def _profile(model: Any, shape: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    """Params/FLOPs/latency on CPU (the model is moved there), as a report dict."""
    import torch

    import prunekit as pk

    return pk.profile(model.cpu().eval(), torch.randn(*shape), latency=not args.no_latency, threads=args.threads).to_dict()


def _meta(shape: tuple[int, ...], num_classes: int | None, in_chans: int | None) -> dict[str, Any]:
    """Extra plan metadata so that ``prunekit.load(dir)`` and later commands need no flags."""
    extra: dict[str, Any] = {"input_shape": list(shape)}
    extra.update({k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None})
    return extra


def _write(out: Path, r: Recipe, report: dict[str, Any], notes: list[str] | None = None, command: str = "") -> None:
    """Write recipe.yaml, report.json and report.md (markdown from prunekit.report plus ``notes``)."""
    from prunekit.persist import atomic_write
    from prunekit.recipe import dump_recipe
    from prunekit.report import environment, markdown

    atomic_write(out / "recipe.yaml", dump_recipe(r, f"resolved options of `prunekit {command}`; rerun with --recipe THIS_FILE"))
    report = {**report, "recipe": r.to_dict(), "environment": environment()}
    atomic_write(out / "report.json", json.dumps(report, indent=1, default=str))
    atomic_write(out / "report.md", markdown(report) + "".join(f"\n{line}\n" for line in notes or []))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


# ----------------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    """Train small_cnn on the embedded digits, prune to ~half the FLOPs, fine-tune with KD, report."""
    import torch

    import prunekit as pk
    from prunekit.measure import human
    from prunekit.plan import PruningPlan
    from prunekit.plot import plot_accuracy_vs_flops
    from prunekit.recipe import load_recipe
    from prunekit.recover import train

    t_start = time.perf_counter()
    r = _recipe(args, base=load_recipe("digits_demo"))
    train_info, test_info = _data(r, "train", r.subset), _data(r, "test")
    train_loader, test_loader = _loaders(r, train_info, test_info)
    nc, ic = r.num_classes or train_info.num_classes, r.in_chans or train_info.in_chans
    torch.manual_seed(r.seed)  # the initial weights depend on --seed only
    model, _ = _model(r.model or "", num_classes=nc, in_chans=ic)
    shape = _shape(r, model, r.model or "", None, train_info)
    out, dev = _out(args.out), _device()
    print(f"prunekit demo: {r.model} on {r.data} ({len(train_info)} train / {len(test_info)} test images, "
          f"{shape[2]}x{shape[3]}), device {dev}, output {out}/")

    print(f"[1/4] training {r.model} for {r.epochs} epochs ({r.optimizer}, lr {r.lr:g}, {r.schedule})")
    res = train(model.to(dev), train_loader, _train_cfg(r, finetune=False), run_dir=out / "baseline",
                progress=not args.no_progress)
    base = _accuracy(model, test_loader)
    pk.save(model.cpu(), PruningPlan({}, {}), out / "baseline", model_spec=r.model, extra=_meta(shape, nc, ic))
    print(f"      {res.wall_time_s:.1f} s, test top-1 {_pct(base['top1'])}; baseline saved to {out / 'baseline'}/")

    goal = f"keep {r.target_flops:.0%} of the FLOPs" if r.target_flops else f"ratio {r.ratio}"
    print(f"[2/4] pruning ({goal}, criterion {r.criterion})")
    x = torch.zeros(*shape)
    t0 = time.perf_counter()
    small, plan = _prune(model.cpu().eval(), x, r)
    prune_s = time.perf_counter() - t0
    pruned = _accuracy(small, test_loader)
    m = plan.meta
    print(f"      pruned {m.get('groups_pruned')}/{m.get('groups')} channel groups, removed {m.get('channels_removed')}/"
          f"{m.get('channels')} channels (ratio {m.get('ratio', 0):.3f}) in {prune_s:.2f} s; "
          f"FLOPs {human(pk.measure.count_flops(model, x))} -> {human(pk.measure.count_flops(small, x))}; "
          f"test top-1 before fine-tuning {_pct(pruned['top1'])}")

    print(f"[3/4] fine-tuning for {r.finetune_epochs} epochs with distillation from the unpruned model "
          f"(alpha {r.kd_alpha:g}, T {r.kd_temperature:g})")
    res_ft = train(small.to(dev), train_loader, _train_cfg(r, finetune=True), teacher=model.to(dev),
                   run_dir=out / "finetune", progress=not args.no_progress)
    after = _accuracy(small, test_loader)
    print(f"      {res_ft.wall_time_s:.1f} s, test top-1 {_pct(after['top1'])}")

    print("[4/4] measuring params, FLOPs" + ("" if args.no_latency else " and batch-1 CPU latency"))
    before_p, after_p = _profile(model, shape, args), _profile(small, shape, args)
    pk.save(small, plan, out, model_spec=r.model, extra=_meta(shape, nc, ic))
    points = [{"label": "original", "flops": before_p["flops"], **base},
              {"label": "pruned", "flops": after_p["flops"], **pruned},
              {"label": "pruned + fine-tuned", "flops": after_p["flops"], **after}]
    plot_accuracy_vs_flops(points, out / "accuracy_vs_flops.png", title=f"{r.model} on {r.data}")
    report = {"command": "demo", "model": r.model, "data": r.data, "input_shape": list(shape),
              "before": {**before_p, **base}, "pruned": {"params": after_p["params"], "flops": after_p["flops"], **pruned},
              "after": {**after_p, **after}, "plan": plan.meta, "prune_seconds": prune_s,
              "train": {"seconds": res.wall_time_s, "epochs": res.epochs_completed, "final": res.final},
              "finetune": {"seconds": res_ft.wall_time_s, "epochs": res_ft.epochs_completed, "final": res_ft.final},
              "wall_seconds": time.perf_counter() - t_start}
    _write(out, r, report, [f"Pruned, before fine-tuning: top1 {pruned['top1']:.4f}, top5 {pruned['top5']:.4f}, "
                            f"loss {pruned['loss']:.4f}.", "![accuracy vs FLOPs](accuracy_vs_flops.png)"], "demo")
    _summary([("original", before_p, base), ("pruned", after_p, pruned), ("pruned + fine-tuned", after_p, after)])
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s. Saved in {out}/:\n"
          f"  model.safetensors, plan.json  pruned + fine-tuned model: prunekit.load('{out}')\n"
          f"  baseline/                     unpruned trained model (+ checkpoint, train log)\n"
          f"  finetune/                     fine-tuning checkpoint and log\n"
          f"  report.md, report.json        before/after figures\n"
          f"  accuracy_vs_flops.png         accuracy vs FLOPs plot\n"
          f"  recipe.yaml                   every option used (prunekit demo --recipe {out}/recipe.yaml reruns it)")
    return 0


def _calibration(r: Recipe) -> Any:
    """Calibration batches (training split, no augmentation, fixed order) when the recipe's
    criterion or method needs data, else None."""
    from prunekit import criteria
    from prunekit.zoo import make_loader

    if not r.method and r.criterion not in criteria.DATA_CRITERIA:
        return None
    if not r.data:
        what = f"--method {r.method}" if r.method else f"--criterion {r.criterion}"
        raise _err(f"{what} needs calibration data: pass --data SPEC (digits, cifar10:PATH, ...)")
    info = _data(Recipe(**{**r.to_dict(), "augment": False}), "train")
    return make_loader(info, batch_size=min(r.batch_size, 64), shuffle=True, seed=r.seed)


def _prune(model: Any, x: Any, r: Recipe) -> tuple[Any, Any]:
    """Prune with the recipe's options (plain criterion pruning, or ``r.method``); returns
    ``(pruned model, plan)``."""
    import prunekit as pk
    from prunekit import methods

    budget = dict(ratio=r.ratio, target_flops=r.target_flops, target_params=r.target_params,
                  target_latency=r.target_latency, ignore=r.ignore or None, ratios=r.ratios or None,
                  global_ranking=r.global_ranking, round_to=r.round_to, min_channels=r.min_channels)
    try:
        loader = _calibration(r)
        if r.method:
            extra = {"criterion": r.criterion} if r.method == "iterative" else {}
            res = methods.get(r.method)(model, x, loader=loader, batches=r.calib_batches, **extra,
                                        **methods.budget_kwargs(budget))
            return res.model, dataclasses.replace(res.plan, meta={**res.plan.meta, "method": r.method})
        ctx = {"loader": loader, "batches": r.calib_batches} if loader is not None else None
        return pk.prune(model, x, criterion=r.criterion, criterion_kwargs=ctx, return_plan=True, **budget)
    except (ValueError, KeyError) as exc:  # PruningError is a ValueError
        raise _err(str(exc.args[0] if exc.args else exc)) from None


def _summary(rows: list[tuple[str, dict[str, Any], dict[str, float]]]) -> None:
    """Print a before/after table of params, FLOPs, latency and accuracy (first row is the reference)."""
    from prunekit.measure import human

    def lat(p: dict[str, Any]) -> str:
        return "-" if not p.get("latency") else f"{p['latency']['median_ms']:.3f} ms"

    n = 6 if any("top1" in a for _, _, a in rows) else 4
    table: list[tuple[str, ...]] = [("", "params", "FLOPs", "latency (b=1)", "top-1", "top-5")]
    table += [(name, human(p["params"]), human(p["flops"]), lat(p), _pct(a.get("top1")), _pct(a.get("top5")))
              for name, p, a in rows]
    ref, last = rows[0][1], rows[-1][1]
    lat_ratio = (f"{last['latency']['median_ms'] / ref['latency']['median_ms']:.3f}x"
                 if ref.get("latency") and last.get("latency") else "-")
    acc = (f"{100 * (rows[-1][2]['top1'] - rows[0][2]['top1']):+.2f} pt" if "top1" in rows[0][2] and "top1" in rows[-1][2]
           else "-")
    table.append(("after/before", f"{last['params'] / ref['params']:.3f}x", f"{last['flops'] / ref['flops']:.3f}x",
                  lat_ratio, acc, ""))
    table = [row[:n] for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(n)]
    print()
    for row in table:
        print(row[0].ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(row[1:], widths[1:])))


def _distributed(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` inside a torchrun process group when launched by torchrun (destroyed afterwards)."""

    @functools.wraps(command)
    def wrapper(args: argparse.Namespace) -> int:
        import torch.distributed as dist

        from prunekit.recover import init_distributed, is_distributed

        created = not is_distributed()
        init_distributed()
        try:
            return command(args)
        finally:
            if created and is_distributed():
                dist.destroy_process_group()

    return wrapper


@_distributed
def cmd_train(args: argparse.Namespace) -> int:
    """Train a model from scratch (resumable, torchrun-aware) and save it with an empty plan."""
    import torch

    from prunekit.plan import PruningPlan
    from prunekit.recover import get_world_size, is_main_process, train

    r = _recipe(args)
    if not r.model:
        raise _err("no model: pass --model SPEC or set model: in the recipe")
    train_info, test_info = _data(r, "train", r.subset), _data(r, "test")
    nc, ic = r.num_classes or train_info.num_classes, r.in_chans or train_info.in_chans
    torch.manual_seed(r.seed)  # the initial weights depend on --seed only
    model, plan = _model(r.model, num_classes=nc, in_chans=ic)
    shape = _shape(r, model, r.model, plan, train_info)
    out, main = _out(args.out), is_main_process()
    train_loader, test_loader = _loaders(r, train_info, test_info)
    if main:
        print(f"prunekit train: {r.model} on {r.data} ({len(train_info)} images, {r.epochs} epoch(s), "
              f"{get_world_size()} process(es)) -> {out}/")
    res = train(model.to(_device()), train_loader, _train_cfg(r, finetune=False), run_dir=out, resume=args.resume,
                progress=not args.no_progress)
    acc = _accuracy(model, test_loader)
    if not main:
        return 0
    spec = plan.meta.get("model_spec", r.model) if plan is not None else r.model
    prof = _profile(model, shape, args)
    import prunekit as pk

    pk.save(model, plan or PruningPlan({}, {}), out, model_spec=None if plan is not None else spec,
            extra=_meta(shape, nc, ic))
    _write(out, r, {"command": "train", "model": spec, "data": r.data, "input_shape": list(shape), "before": {},
                    "after": {**prof, **acc}, "train": {"seconds": res.wall_time_s, "epochs": res.epochs_completed,
                    "resumed_from_epoch": res.resumed_from_epoch, "history": res.history}}, command="train")
    print(f"trained {res.epochs_completed} epoch(s) ({res.wall_time_s:.1f} s this run): test top-1 {_pct(acc['top1'])}, "
          f"top-5 {_pct(acc['top5'])}, loss {acc['loss']:.4f}\nsaved {out}/model.safetensors + plan.json "
          f"(prunekit.load('{out}')), checkpoint.pt, train_log.jsonl, report.md, recipe.yaml")
    return 0


@_distributed
def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a saved pruned model (optionally distilling from a teacher) and save it with the same plan."""
    import prunekit as pk
    from prunekit.recover import is_main_process, train

    r = _recipe(args)
    if not Path(args.pruned).expanduser().is_dir():
        raise _err(f"--pruned {args.pruned}: not a directory saved by prunekit (model.safetensors + plan.json)")
    train_info, test_info = _data(r, "train", r.subset), _data(r, "test")
    model, plan = _model(args.pruned, num_classes=None, in_chans=None, flag="--pruned")
    teacher = None
    if args.teacher:
        teacher, _ = _model(args.teacher, num_classes=r.num_classes or train_info.num_classes,
                            in_chans=r.in_chans or train_info.in_chans, flag="--teacher", weights=args.teacher_weights)
    shape = _shape(r, model, plan.meta.get("model_spec", ""), plan, train_info)
    out, main = _out(args.out), is_main_process()
    train_loader, test_loader = _loaders(r, train_info, test_info)
    dev = _device()
    before = _accuracy(model.to(dev), test_loader)
    if main:
        print(f"prunekit finetune: {args.pruned} on {r.data}, {r.finetune_epochs} epoch(s)"
              f"{f', distilling from {args.teacher}' if teacher is not None else ''}; test top-1 now {_pct(before['top1'])}")
    res = train(model, train_loader, _train_cfg(r, finetune=True), teacher=teacher.to(dev) if teacher is not None else None,
                run_dir=out, resume=args.resume, progress=not args.no_progress)
    after = _accuracy(model, test_loader)
    if not main:
        return 0
    prof = _profile(model, shape, args)
    pk.save(model, plan, out)
    _write(out, r, {"command": "finetune", "model": plan.meta.get("model_spec"), "pruned": str(args.pruned),
                    "teacher": args.teacher, "data": r.data, "input_shape": list(shape), "before": {**prof, **before},
                    "after": {**prof, **after}, "plan": plan.meta,
                    "finetune": {"seconds": res.wall_time_s, "epochs": res.epochs_completed, "history": res.history}},
           command="finetune")
    print(f"test top-1 {_pct(before['top1'])} -> {_pct(after['top1'])} ({res.wall_time_s:.1f} s); saved {out}/ "
          f"(model.safetensors, plan.json, report.md, recipe.yaml, checkpoint.pt)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Print JSON with top-1/top-5/loss on a split plus params, FLOPs, latency and throughput."""
    import torch

    from prunekit.measure import count_flops, count_params, measure_latency
    from prunekit.zoo import make_loader

    r = _recipe(args)
    if args.latency_batch < 1:
        raise _err(f"--latency-batch {args.latency_batch}: must be >= 1")
    info = _data(r, args.split, r.subset)
    model, plan = _model(args.model, num_classes=r.num_classes or info.num_classes, in_chans=r.in_chans or info.in_chans,
                         weights=args.weights)
    model = model.to(_device()).eval()
    loader = make_loader(info, batch_size=r.eval_batch_size, shuffle=False, seed=r.seed, num_workers=r.workers)
    result: dict[str, Any] = {"model": args.model, "data": r.data, "split": args.split, "images": len(info)}
    result.update(_accuracy(model, loader))
    model = model.cpu()
    x = torch.randn(*_shape(r, model, args.model, plan, info))
    result.update(params=count_params(model), flops=count_flops(model, x), input_shape=list(x.shape))
    if not args.no_latency:
        for b in (1, args.latency_batch):
            lat = measure_latency(model, x.expand(b, *x.shape[1:]).contiguous(), threads=args.threads)
            result[f"latency_batch{b}"] = {"median_ms": lat.median_ms, "iqr_ms": lat.iqr_ms,
                                           "images_per_s": lat.throughput, "threads": lat.threads}
    print(json.dumps(result, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export to ONNX and check the outputs against PyTorch with onnxruntime."""
    import torch

    from prunekit.export import OnnxCheckError, export_onnx

    r = _recipe(args)
    model, plan = _model(args.model, num_classes=r.num_classes, in_chans=r.in_chans)
    spec = plan.meta.get("model_spec", args.model) if plan is not None else args.model
    shape = _shape(r, model, spec, plan)
    try:
        fig = export_onnx(model, torch.randn(*shape), args.out, opset=args.opset, atol=args.atol)
    except ImportError as exc:
        raise _err(str(exc)) from None
    except OnnxCheckError as exc:
        print(f"prunekit export: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {fig['path']} ({fig['bytes'] / 1e6:.2f} MB, opset {fig['opset']}, {fig['exporter']} exporter, "
          f"input {list(shape)} with dynamic batch)\nonnxruntime check: max abs diff {fig['max_abs_diff']:.3g} "
          f"(tolerance {fig['atol']:g} + {fig['rtol']:g}*|y|): outputs match")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """``prunekit prune`` with --recipe, --target-flops and saved (trained) model directories."""
    import torch

    import prunekit as pk

    if args.ratios is not None:
        try:
            args.ratios = {k: float(v) for k, v in (item.split("=", 1) for item in args.ratios)}
        except ValueError:
            raise _err(f"--ratios {' '.join(args.ratios)}: expected MODULE=RATIO entries, e.g. layer4=0.7") from None
    r = _recipe(args)
    if not r.model:
        raise _err("no model: pass --model SPEC or set model: in the recipe")
    model, plan0 = _model(r.model, num_classes=r.num_classes, in_chans=r.in_chans)
    if plan0 is not None and not plan0.is_empty:
        raise _err(f"--model {r.model}: already pruned; prune the unpruned model it came from instead")
    spec = plan0.meta.get("model_spec", r.model) if plan0 is not None else r.model
    meta0 = plan0.meta if plan0 is not None else {}
    nc, ic = r.num_classes or meta0.get("num_classes"), r.in_chans or meta0.get("in_chans")
    shape = _shape(r, model, spec, plan0)
    x = torch.randn(*shape)
    t0 = time.perf_counter()
    small, plan = _prune(model.eval(), x, r)
    seconds = time.perf_counter() - t0
    out = _out(args.out)  # only once the input is known to be good
    before, after = _profile(model, shape, args), _profile(small, shape, args)
    pk.save(small, plan, out, model_spec=spec, extra=_meta(shape, nc, ic))
    _write(out, r, {"command": "prune", "model": spec, "input_shape": list(shape), "ratio": plan.meta.get("ratio"),
                    "target_flops": r.target_flops, "criterion": r.criterion, "method": r.method, "prune_seconds": seconds,
                    "before": before, "after": after, "plan": plan.meta}, command="prune")
    _summary([("before", before, {}), ("after", after, {})])
    print(f"pruned {plan.meta.get('groups_pruned', 0)}/{plan.meta.get('groups', 0)} groups (ratio "
          f"{plan.meta.get('ratio', 0):.3f}) in {seconds:.2f} s; saved to {out}/ (model.safetensors, plan.json, "
          f"report.json, report.md, recipe.yaml)")
    return 0


# ----------------------------------------------------------------------------------- parsers

_SHAPE = [("--input-shape", "input_shape", str,
           "example input shape, batch first, e.g. 1,3,32,32 (default: from the data or saved model)")]
_MODEL = "model: a zoo name (resnet56), torchvision:NAME, timm:NAME, path/to/file.py:build_fn"


def _extend_prune(p: argparse.ArgumentParser) -> None:
    """Add the pipeline options (--target-flops, ...) to main.py's ``prune`` parser and route it
    to :func:`cmd_prune`, which resolves recipe + flags."""
    _add(p, _PRUNE)
    p.set_defaults(func=cmd_prune)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the pipeline sub-commands on the CLI's sub-parser set (and extend ``prune``)."""
    from prunekit.recipe import load_recipe

    if "prune" in sub.choices:
        _extend_prune(sub.choices["prune"])

    demo = load_recipe("digits_demo")
    p = sub.add_parser("demo", help="train, prune and fine-tune small_cnn on the embedded digits (CPU, < 1 min)",
                       description="The end-to-end demo: train small_cnn on scikit-learn's digits (upsampled to 16x16), "
                       "prune it to about half its FLOPs, fine-tune it with distillation from the unpruned model, "
                       "measure accuracy, params, FLOPs and latency before/after, and save the model, a report, "
                       "the resolved recipe and an accuracy-vs-FLOPs plot. Defaults come from the packaged "
                       "recipe digits_demo.yaml. Needs no download.")
    _run_opts(p, out="runs/demo")
    p.add_argument("--epochs", dest="epochs", type=int, default=None, help=f"training epochs (default {demo['epochs']})")
    p.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, default=None,
                   help=f"fine-tuning epochs after pruning (default {demo['finetune_epochs']})")
    p.add_argument("--target-flops", dest="target_flops", type=float, default=None,
                   help=f"fraction of FLOPs the pruned model keeps, in (0, 1] (default {demo['target_flops']})")
    p.add_argument("--seed", dest="seed", type=int, default=None, help=f"random seed (default {demo.get('seed', 0)})")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model (resumable checkpoints; works under torchrun)",
                       description="Baseline training. A checkpoint is written after every epoch (--resume continues "
                       "it exactly); the final weights are saved as model.safetensors + plan.json so that "
                       "prunekit.load(OUT) and prunekit prune --model OUT work. Under torchrun only rank 0 writes.")
    p.add_argument("--model", dest="model", default=None, help=_MODEL + " (recipe key model)")
    _run_opts(p)
    _add(p, _DATA + _TRAIN + _SHAPE)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a pruned model, optionally distilling from a teacher",
                       description="Load a pruned model saved by prunekit (prune/demo/finetune output), fine-tune it "
                       "and save it with the same plan and new weights, with accuracy before/after in the report.")
    p.add_argument("--pruned", required=True, help="directory of the pruned model (model.safetensors + plan.json)")
    p.add_argument("--teacher", default=None, help="teacher for distillation: a saved directory (e.g. the prunekit "
                   "train output) or a model spec with --teacher-weights (default: no distillation)")
    p.add_argument("--teacher-weights", default=None, help="state-dict file (.pt/.safetensors) for a --teacher spec")
    _run_opts(p)
    ft = [("--epochs", "finetune_epochs", int, "fine-tuning epochs"), ("--lr", "finetune_lr", float, "peak learning rate")]
    _add(p, _DATA + ft + [o for o in _TRAIN if o[1] not in ("epochs", "lr")] + _KD + _SHAPE)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="accuracy, loss, latency and throughput of a model on a data split (JSON)",
                       description="Evaluate top-1/top-5/loss on a split and measure params, FLOPs and CPU latency "
                       "at batch 1 and --latency-batch; prints JSON.")
    p.add_argument("--model", required=True, help=_MODEL + ", or a directory saved by prunekit")
    p.add_argument("--weights", default=None, help="state-dict file (.pt/.safetensors) for a --model spec")
    p.add_argument("--split", default="test", choices=("train", "test", "val"), help="data split ('val' = test; default test)")
    p.add_argument("--recipe", default=None, help="YAML recipe (for data, sizes); flags override it")
    _add(p, _DATA + [o for o in _TRAIN if o[1] == "seed"] + _SHAPE)
    p.add_argument("--latency-batch", type=int, default=64, help="the larger batch size for latency/throughput (default 64)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for latency measurement (default: torch's)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export to ONNX and check it against PyTorch with onnxruntime",
                       description="Write an ONNX file (dynamic batch axis) and compare onnxruntime's output with "
                       "PyTorch's on a random input; exits 1 if they differ. Needs pip install 'prunekit[export]'.")
    p.add_argument("--model", required=True, help=_MODEL + ", or a directory saved by prunekit")
    p.add_argument("--out", required=True, help="the .onnx file to write (replaced atomically, only if the check passes)")
    _add(p, [o for o in _DATA if o[1] in ("num_classes", "in_chans")] + _SHAPE)
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of the check, plus 1e-3 relative (default 1e-4)")
    p.set_defaults(func=cmd_export)
