"""Helpers shared by the ``prunekit`` sub-commands (one module per command in this package).

Recipe-backed options resolve in three layers: flags the user passed, then ``--recipe FILE``
(see :mod:`prunekit.recipe`), then built-in defaults; that is why every recipe-backed flag
has an argparse default of None. Only rank 0 writes files; a run's files are written into a
new directory that replaces ``--out`` as a whole (:func:`prunekit.runtime.atomic_directory`),
carrying over whatever else was in ``--out``, so nothing already there is removed. Heavy
modules (torch, the zoo) are imported inside the functions so that building the parser stays
cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunekit.config import PruneConfig
from prunekit.recipe import DEFAULTS, Recipe


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (``--threads``, ``--in-chans``, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def resolve_input_shape(text: str | None, model: Any, spec: str) -> tuple[int, ...]:
    """The example input shape: ``text`` (``--input-shape``, e.g. ``1,3,224,224``; ``1,16``
    tokens for a text model) when given, else the model's own config (timm; a transformers
    model's: :func:`prunekit.zoo.hf.hf_default_shape`), else 224 (299 for inception) for
    torchvision models, else ``(1, in_chans, 32, 32)``. A malformed ``text`` raises
    :class:`CliError`."""
    if text:
        try:
            shape = tuple(int(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            raise CliError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,224,224") from None
        if len(shape) < 2 or any(v <= 0 for v in shape):
            raise CliError(f"--input-shape {text!r}: expected positive sizes, batch first")
        return shape
    from prunekit.zoo.hf import hf_default_shape, is_hf_model

    if is_hf_model(model):  # (1, tokens) for a text model, (1, C, H, W) for a vision one
        return hf_default_shape(model)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return (1, *cfg["input_size"])
    if spec.startswith("torchvision:"):
        return (1, 3, 299, 299) if "inception" in spec else (1, 3, 224, 224)
    in_chans = getattr(model, "in_chans", 3)
    return (1, in_chans, 32, 32)


def example_inputs(model: Any, shape: tuple[int, ...]) -> Any:
    """The example input of ``model`` at ``shape``: for a transformers model its keyword inputs
    (token ids and an attention mask, or pixel values: :func:`prunekit.zoo.hf.hf_example_inputs`),
    else a random tensor. A shape a text model cannot take is a :class:`CliError`."""
    import torch

    from prunekit.zoo.hf import hf_example_inputs, is_hf_model

    if is_hf_model(model):
        try:
            return hf_example_inputs(model, shape)
        except ValueError as exc:
            raise CliError(f"--input-shape: {exc}") from None
    return torch.randn(*shape)


def default_ignore(model: Any) -> list[str]:
    """Modules pruning keeps unless ``--ignore`` says otherwise: a transformers model's task
    head (:func:`prunekit.zoo.hf.hf_head_modules`); none for other models."""
    from prunekit.zoo.hf import hf_head_modules, is_hf_model

    return hf_head_modules(model) if is_hf_model(model) else []


def model_from_spec(spec: str, num_classes: int | None, in_chans: int | None) -> Any:
    """Build the model named by ``spec`` (zoo name, ``torchvision:``, ``timm:``, ``file.py:fn``);
    an unknown or broken spec raises :class:`CliError` naming ``--model``."""
    from prunekit.zoo import resolve_model

    try:
        return resolve_model(spec, num_classes=num_classes, in_chans=in_chans)
    except (KeyError, ValueError, FileNotFoundError, ImportError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise CliError(f"--model {spec}: {msg}") from None


def add_model_options(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """Add ``--model``, ``--num-classes``, ``--in-chans``, ``--input-shape``, ``--threads`` and
    ``--no-latency`` (the options of ``prune``, ``profile`` and ``graph``)."""
    p.add_argument("--model", required=model_required,
                   help="model: a zoo name (resnet56), torchvision:NAME, timm:NAME, hf:NAME (a bundled transformers "
                   "config: bert, gpt2, llama, vit, swin, segformer; or a config.json / a directory holding one) or "
                   "path/to/file.py:build_fn"
                   + ("" if model_required else ", or a directory written by `prunekit train` (default: the recipe's)"))
    p.add_argument("--num-classes", type=positive_int, default=None, help="number of output classes (default: the model's)")
    p.add_argument("--in-chans", type=positive_int, default=None, help="input channels for zoo/timm models (default: 3)")
    p.add_argument("--input-shape", default=None,
                   help="example input shape, batch first, e.g. 1,3,224,224 (default: from the model)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for latency measurement (default: torch's)")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")


# Recipe-backed option tables: (flag, recipe key, type, help); type None means a
# --flag/--no-flag switch.
OptionTable = list[tuple[str, str, Any, str]]

DATA_OPTIONS: OptionTable = [
    ("--data", "data", str,
     "data set: digits, cifar10:PATH, cifar100:PATH, mnist:DIR, fashion-mnist[:DIR], npz:FILE, imagefolder:DIR"),
    ("--num-classes", "num_classes", int, "classifier outputs (default: the data set's)"),
    ("--in-chans", "in_chans", int, "input channels (default: the data set's)"),
    ("--image-size", "image_size", int, "resize images to this size (default: the data set's; digits: 16)"),
    ("--subset", "subset", int, "use a class-balanced subset of N images (of the training split; of --split for eval)"),
    ("--workers", "workers", int, "DataLoader worker processes"),
    ("--eval-batch-size", "eval_batch_size", int, "batch size for evaluation")]
TRAIN_OPTIONS: OptionTable = [
    ("--epochs", "epochs", int, "training epochs"), ("--lr", "lr", float, "peak learning rate"),
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
FINETUNE_OPTIONS: OptionTable = [
    ("--epochs", "finetune_epochs", int, "fine-tuning epochs (prune: the training epochs of a method that prunes "
     "while training: slimming, scp, dais, autopruner)"),
    ("--lr", "finetune_lr", float, "peak learning rate of the fine-tuning (prune: of a method's training)")]
"""``--epochs``/``--lr`` of the commands that fine-tune a trained model (``finetune``, and ``prune``
with a training method, whose training is that fine-tune): the recipe's fine-tuning keys."""
SHAPE_OPTIONS: OptionTable = [
    ("--input-shape", "input_shape", str,
     "example input shape, batch first, e.g. 1,3,32,32 (default: from the data or saved model)")]
MODEL_HELP = "model: a zoo name (resnet56), torchvision:NAME, timm:NAME, hf:NAME, path/to/file.py:build_fn"
FLAG_NAMES = {"finetune_epochs": "--epochs", "finetune_lr": "--lr"}
"""Recipe keys whose flag is not ``--`` plus the key (``finetune``'s ``--epochs``), for messages."""


def round_to_arg(text: str) -> int | str:
    """``--round-to``: an integer, or ``auto`` (the multiple chosen by timing)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: an integer or 'auto'") from None


def add_recipe_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    """Add recipe-backed options with default None (so recipe values are only overridden when passed)."""
    for flag, key, typ, text in table:
        text = option_help(text, key)
        if typ is None:
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            many = "*" if isinstance(DEFAULTS[key], list) else None
            p.add_argument(flag, dest=key, type=typ, nargs=many, default=None, metavar=key.upper(), help=text)


def option_help(text: str, key: str) -> str:
    """Help text plus the recipe key and (unless the text already says it) the built-in default."""
    default = DEFAULTS[key]
    shown = "" if default in (None, [], {}) or "default" in text else f"; default {default}"
    return f"{text} (recipe key {key}{shown})"


def add_run_options(p: argparse.ArgumentParser, *, out: str | None = None) -> None:
    """Options shared by the commands that write a run directory."""
    p.add_argument("--recipe", default=None, help="YAML recipe file or packaged recipe name (resnet20_cifar10, "
                   "resnet56_cifar10, vgg16_cifar10, mobilenetv2_cifar10, digits_demo); flags override it")
    p.add_argument("--out", default=out, required=out is None,
                   help="run directory (created; files in it are replaced atomically, none is deleted)"
                   + (f"; default {out}" if out else ""))
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for latency measurement (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bars")


def resolve_recipe(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Recipe:
    """Resolve flags > --recipe > ``base`` > defaults into a checked Recipe (errors become CliError)."""
    from prunekit.recipe import load_recipe, resolve

    try:
        recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else None
        r, _ = resolve(vars(args), recipe, recipe_file=getattr(args, "recipe", None), flag_names=FLAG_NAMES, base=base)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    return r


def output_dir(path: str | None) -> Path:
    """``--out`` as a directory, created on the main process (after restoring a run that a
    killed writer left moved aside, :func:`prunekit.runtime.recover_directory`); a path that
    exists and is not a directory raises :class:`CliError`."""
    from prunekit.recover import is_main_process
    from prunekit.runtime import recover_directory

    out = Path(path or ".").expanduser()
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {path}: exists and is not a directory")
    if is_main_process():
        recover_directory(out)
        out.mkdir(parents=True, exist_ok=True)
    return out


def load_data(r: Recipe, split: str, subset: int | None = None, val_size: int = 0) -> Any:
    """Load the recipe's data set split (``val_size`` images held out of train as "val"); a missing
    or placeholder path is a CliError naming --data."""
    from prunekit.zoo import load_dataset

    if not r.data:
        raise CliError("no data set: pass --data SPEC (digits, cifar10:PATH, ...) or set data: in the recipe")
    name, _, path = r.data.partition(":")
    if path == "PATH":
        raise CliError(f"--data {r.data}: the recipe's data path is a placeholder; pass --data {name}:/path/to/{name}")
    try:
        return load_dataset(r.data, split=split, augment=r.augment if split == "train" else False, subset=subset,
                            seed=r.seed, image_size=r.image_size, val_size=val_size)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(f"--data {r.data}: {exc}") from None


def load_model(spec: str, *, num_classes: int | None, in_chans: int | None, flag: str = "--model",
               weights: str | None = None, trust_code: bool = False) -> tuple[Any, Any]:
    """Return ``(model, plan)``: a saved directory via ``prunekit.load`` (plan from it) or a spec (plan None).

    A directory whose plan names a Python file to build the model from is refused unless
    ``trust_code`` (``--trust-code``); a file spec the user gave as ``spec`` is their choice and runs."""
    import prunekit as pk
    from prunekit.persist import UntrustedCodeError, load_plan
    from prunekit.zoo import resolve_model

    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            return pk.load(path, trust_code=trust_code), load_plan(path)
        return resolve_model(spec, num_classes=num_classes, in_chans=in_chans, weights=weights), None
    except UntrustedCodeError as exc:  # already names the directory and the way out
        raise CliError(str(exc)) from None
    except (KeyError, ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        raise CliError(f"{flag} {spec}: {exc.args[0] if exc.args else exc}") from None


def add_trust_code_option(p: argparse.ArgumentParser) -> None:
    """Add ``--trust-code`` to a command that loads run directories (see :func:`load_model`)."""
    p.add_argument("--trust-code", action="store_true",
                   help="let a run directory's plan.json name a Python file (path/to/file.py:build) that is "
                   "imported and run to build the model; only for runs from a source you trust")


def add_val_size_option(p: argparse.ArgumentParser, what: str) -> None:
    """Add ``--val-size N``: images held out of the training split as the 'val' split
    (class-balanced, a fixed choice; the training split then excludes them); ``what`` says
    what the command does with them."""
    p.add_argument("--val-size", type=int, default=0,
                   help=f"images held out of the training split as 'val' (class-balanced, fixed choice){what}")


def check_resume(out: str) -> None:
    """With ``--resume``: ``OUT/checkpoint.pt`` must exist and load, else :class:`CliError`.

    Checked before anything is loaded or written, so a mistyped ``--out`` is not trained from
    scratch over (the library's ``train(resume=True)`` starts fresh without a checkpoint), and a
    truncated or refused checkpoint is one line naming the file.
    """
    from prunekit.recover.checkpoint import load_checkpoint
    from prunekit.recover.train import CHECKPOINT_NAME

    ckpt = Path(out).expanduser() / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise CliError(f"--resume: no {CHECKPOINT_NAME} in {out}")
    try:
        load_checkpoint(ckpt)
    except ValueError as exc:
        raise CliError(f"--resume: {exc}") from None


def check_in_chans(r: Recipe, info: Any, plan: Any, what: str) -> None:
    """Refuse a data set whose images have another channel count than the model takes, before
    any training: a saved run's ``in_chans`` (its plan), else ``--in-chans``; ``what`` says
    where that came from (``saved in --pruned DIR``) in the message."""
    chans = r.in_chans
    if plan is not None:
        shape = plan.meta.get("input_shape") or [None, None]
        chans = plan.meta.get("in_chans") or shape[1]
    if chans is not None and chans != info.in_chans:
        raise CliError(f"--data {r.data}: {info.in_chans}-channel images, but the model takes in_chans={chans} ({what})")


def example_shape(r: Recipe, model: Any, spec: str, plan: Any, info: Any = None) -> tuple[int, ...]:
    """Example input shape: --input-shape, else the data set's, else the saved one, else the model's default."""
    if r.input_shape:
        return resolve_input_shape(r.input_shape, model, spec)
    if info is not None:
        return (1, info.in_chans, info.image_size, info.image_size)
    if plan is not None and plan.meta.get("input_shape"):
        return tuple(plan.meta["input_shape"])
    shape = resolve_input_shape(None, model, spec)
    return (shape[0], r.in_chans, *shape[2:]) if r.in_chans else shape


def train_config(r: Recipe, *, finetune: bool) -> Any:
    """The :class:`prunekit.recover.TrainConfig` of the recipe: its training options, or with
    ``finetune`` its fine-tuning epochs and learning rate and no warm-up."""
    from prunekit.recover import TrainConfig

    return TrainConfig(epochs=r.finetune_epochs if finetune else r.epochs, lr=r.finetune_lr if finetune else r.lr,
                       optimizer=r.optimizer, momentum=r.momentum, nesterov=r.nesterov, weight_decay=r.weight_decay,
                       schedule=r.schedule, milestones=tuple(r.milestones), gamma=r.gamma,
                       warmup_epochs=0.0 if finetune else r.warmup_epochs, label_smoothing=r.label_smoothing,
                       batch_size=r.batch_size, seed=r.seed, kd_alpha=r.kd_alpha, kd_temperature=r.kd_temperature,
                       tensorboard=r.tensorboard, amp=r.amp, channels_last=r.channels_last, grad_clip=r.grad_clip)


def make_loaders(r: Recipe, train_info: Any, test_info: Any) -> tuple[Any, Any]:
    """``(train loader, test loader)`` for the recipe's batch sizes, seed and workers
    (distributed samplers under torchrun); only the training loader shuffles."""
    from prunekit.recover import is_distributed
    from prunekit.zoo import make_loader

    dist = is_distributed()
    return (make_loader(train_info, batch_size=r.batch_size, shuffle=True, seed=r.seed, num_workers=r.workers, distributed=dist),
            make_loader(test_info, batch_size=r.eval_batch_size, shuffle=False, seed=r.seed, num_workers=r.workers,
                        distributed=dist))


def default_device() -> Any:
    """This process's CUDA device (``LOCAL_RANK`` under torchrun) if there is one, else the CPU."""
    import os

    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")


def accuracy(model: Any, loader: Any) -> dict[str, float]:
    """Top-1, top-5 and loss of ``model`` on ``loader``."""
    from prunekit.recover import evaluate

    m = evaluate(model, loader)
    return {k: m[k] for k in ("top1", "top5", "loss")}


def profile_report(model: Any, shape: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    """Params/FLOPs/latency on CPU (the model is moved there), as a report dict."""
    import prunekit as pk

    model = model.cpu().eval()
    return pk.profile(model, example_inputs(model, shape), latency=not args.no_latency, threads=args.threads).to_dict()


def run_meta(shape: tuple[int, ...], num_classes: int | None, in_chans: int | None) -> dict[str, Any]:
    """Extra plan metadata so that ``prunekit.load(dir)`` and later commands need no flags."""
    extra: dict[str, Any] = {"input_shape": list(shape)}
    extra.update({k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None})
    return extra


def write_run(out: Path, r: Recipe, report: dict[str, Any], notes: list[str] | None = None, command: str = "") -> None:
    """Write recipe.yaml, report.json and report.md (markdown from prunekit.report plus ``notes``)
    into ``out``, a directory being written by :func:`prunekit.runtime.atomic_directory` together
    with the run's model files, so that the whole run replaces ``--out`` at once."""
    from prunekit.recipe import dump_recipe
    from prunekit.report import environment, markdown

    (out / "recipe.yaml").write_text(dump_recipe(r, f"resolved options of `prunekit {command}`; rerun with --recipe THIS_FILE"))
    report = {**report, "recipe": r.to_dict(), "environment": environment()}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report) + "".join(f"\n{line}\n" for line in notes or []))


def pct(v: float | None) -> str:
    """A fraction as a percentage with two decimals; ``-`` for None."""
    return "-" if v is None else f"{100 * v:.2f}%"


def print_summary(rows: list[tuple[str, dict[str, Any], dict[str, float]]]) -> None:
    """Print a before/after table of params, FLOPs, latency and accuracy (first row is the reference)."""
    from prunekit.measure import human

    def lat(p: dict[str, Any]) -> str:
        return "-" if not p.get("latency") else f"{p['latency']['median_ms']:.3f} ms"

    n = 6 if any("top1" in a for _, _, a in rows) else 4
    table: list[tuple[str, ...]] = [("", "params", "FLOPs", "latency (b=1)", "top-1", "top-5")]
    table += [(name, human(p["params"]), human(p["flops"]), lat(p), pct(a.get("top1")), pct(a.get("top5")))
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


def distributed(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` inside a torchrun process group when launched by torchrun (destroyed afterwards)."""

    @functools.wraps(command)
    def wrapper(args: argparse.Namespace) -> int:
        from prunekit.recover import init_distributed, is_distributed, shutdown_distributed

        created = not is_distributed()
        init_distributed()
        ok = False
        try:
            code = command(args)
            ok = True
            return code
        finally:
            if created:
                shutdown_distributed(synchronise=ok)

    return wrapper


def calibration_loader(r: Recipe) -> Any:
    """Calibration batches (training split, no augmentation, fixed order) when the recipe's
    criterion or method needs data, else None. Every method is taken to need data unless its
    function has ``needs_data = False`` (then ``--data`` is optional, and used when given)."""
    from prunekit import criteria
    from prunekit.zoo import make_loader

    if r.method:  # an unknown name is the error, not the data it would need
        from prunekit import methods

        try:
            method = methods.get(r.method)
        except KeyError as exc:
            raise CliError(f"--method {r.method}: {exc.args[0]}") from None
        if not r.data and getattr(method, "needs_data", True) is False:
            return None  # a weight-only method (its function says needs_data = False)
    elif r.criterion not in criteria.DATA_CRITERIA:
        return None
    if not r.data:
        what = f"--method {r.method}" if r.method else f"--criterion {r.criterion}"
        raise CliError(f"{what} needs calibration data: pass --data SPEC (digits, cifar10:PATH, ...)")
    info = load_data(Recipe(**{**r.to_dict(), "augment": False}), "train")
    return make_loader(info, batch_size=min(r.batch_size, 64), shuffle=True, seed=r.seed)


def prune_options(r: Recipe) -> PruneConfig:
    """The recipe's pruning options as a :class:`prunekit.PruneConfig`: the one place where
    recipe keys (and so the prune flags, which resolve into the recipe) map to pruning
    options. Calibration data (``criterion_kwargs``) is added when pruning."""
    return PruneConfig(ratio=r.ratio, criterion=r.criterion, ignore=r.ignore, ratios=r.ratios,
                       global_ranking=r.global_ranking, allocation=r.allocation, round_to=r.round_to,
                       round_backend=r.round_backend, min_channels=r.min_channels, target_flops=r.target_flops,
                       target_params=r.target_params, target_latency=r.target_latency)


def prune_with_recipe(model: Any, x: Any, r: Recipe) -> tuple[Any, Any]:
    """Prune with the recipe's options (plain criterion pruning, or ``r.method``); returns
    ``(pruned model, plan)``."""
    import prunekit as pk
    from prunekit import methods

    try:
        cfg = prune_options(r)
        loader = calibration_loader(r)
        if r.partitions is not None and r.method != "partition":
            raise CliError(f"--partitions {r.partitions}: only --method partition takes a partition count")
        if r.method:  # a method chooses its criterion; iterative takes the recipe's as an argument
            extra: dict[str, Any] = {"criterion": r.criterion} if r.method == "iterative" else {}
            if r.method == "partition" and r.partitions is not None:
                extra["partitions"] = r.partitions
            res = methods.get(r.method)(model, x, loader=loader, batches=r.calib_batches, config=cfg, **extra)
            return res.model, method_plan(res, r)
        ctx = {"loader": loader, "batches": r.calib_batches} if loader is not None else None
        return pk.prune(model, x, cfg, criterion_kwargs=ctx, return_plan=True)
    except (ValueError, KeyError) as exc:  # PruningError is a ValueError
        raise CliError(str(exc.args[0] if exc.args else exc)) from None


def method_plan(res: Any, r: Recipe) -> Any:
    """The method's plan with the method's name in its metadata."""
    return dataclasses.replace(res.plan, meta={**res.plan.meta, "method": r.method})


def method_trains(name: str | None) -> bool:
    """Whether the method ``name`` prunes while training (its function has ``trains = True``);
    False without a method; an unknown name is a :class:`CliError` listing the methods."""
    if not name:
        return False
    from prunekit import methods

    try:
        return bool(getattr(methods.get(name), "trains", False))
    except KeyError as exc:
        raise CliError(f"--method {name}: {exc.args[0]}") from None


def training_dir(out: str) -> Path:
    """Where a training method's checkpoints live while it runs: the hidden sibling
    ``.NAME.training`` of ``--out``, which survives a kill (``--resume`` continues from it)
    and is removed once the run is written."""
    path = Path(out).expanduser()
    return path.parent / f".{path.name}.training"


@dataclasses.dataclass
class Source:
    """The unpruned model a pruning command starts from: the model, the plan of a saved run
    directory (None for a spec), the model spec recorded for :func:`prunekit.load`, the class
    and input-channel counts, and the training split's info when it was loaded to size a model
    built from a spec (else None)."""

    model: Any
    plan: Any
    spec: str
    num_classes: int | None
    in_chans: int | None
    data_info: Any = None


def load_source(r: Recipe, args: argparse.Namespace) -> Source:
    """The recipe's unpruned model (``--model``: a spec, seeded by the recipe's seed so every
    run and resume starts from the same weights, sized for ``--data`` unless ``--num-classes`` /
    ``--in-chans`` say otherwise; or a directory written by ``prunekit train``). A missing
    model or an already pruned directory is a :class:`CliError`."""
    import torch

    if not r.model:
        raise CliError("no model: pass --model SPEC or set model: in the recipe")
    torch.manual_seed(r.seed)
    nc0, ic0, data_info = r.num_classes, r.in_chans, None
    if r.data and (nc0 is None or ic0 is None) and not Path(r.model).expanduser().is_dir():
        data_info = load_data(r, "train")  # a model built from a spec fits the data it is calibrated/trained on
        nc0, ic0 = nc0 or data_info.num_classes, ic0 or data_info.in_chans
        torch.manual_seed(r.seed)
    model, plan0 = load_model(r.model, num_classes=nc0, in_chans=ic0, trust_code=args.trust_code)
    if plan0 is not None and not plan0.is_empty:
        raise CliError(f"--model {r.model}: already pruned; prune the unpruned model it came from instead")
    spec = plan0.meta.get("model_spec", r.model) if plan0 is not None else r.model
    meta0 = plan0.meta if plan0 is not None else {}
    return Source(model, plan0, spec, nc0 or meta0.get("num_classes"), ic0 or meta0.get("in_chans"), data_info)


def training_data(r: Recipe, args: argparse.Namespace, plan0: Any) -> tuple[Any, Any, Any]:
    """``(training loader, validation loader or None, training split info)`` of a method that
    trains or searches on data: the training split with the recipe's augmentation less
    ``--val-size`` held-out images, which form the validation loader when given. A missing
    ``--data``, a negative ``--val-size`` or images with another channel count than the model
    takes are a :class:`CliError`."""
    from prunekit.zoo import make_loader

    if not r.data:
        raise CliError(f"--method {r.method} trains the network: pass --data SPEC (digits, cifar10:PATH, ...)")
    val_size = int(getattr(args, "val_size", 0) or 0)
    if val_size < 0:
        raise CliError(f"--val-size {val_size}: must be >= 0")
    train_info = load_data(r, "train", r.subset, val_size=val_size)
    check_in_chans(r, train_info, plan0, f"saved in --model {r.model}" if plan0 is not None else "from --in-chans")
    val_loader = None
    if val_size:
        val_info = load_data(r, "val", val_size=val_size)
        val_loader = make_loader(val_info, batch_size=r.batch_size, shuffle=True, seed=r.seed + 1, num_workers=r.workers)
    loader = make_loader(train_info, batch_size=r.batch_size, shuffle=True, seed=r.seed, num_workers=r.workers)
    return loader, val_loader, train_info


def prune_while_training(model: Any, r: Recipe, args: argparse.Namespace, spec: str, plan0: Any) -> tuple[Any, Any, Any, tuple[int, ...]]:
    """Run the training method ``r.method`` (see :func:`method_trains`): the data of
    :func:`training_data` (``val_loader`` when ``--val-size`` is given),
    ``finetune_epochs`` epochs (``--epochs``) of :func:`train_config` with
    ``finetune=True``, checkpoints in :func:`training_dir` (``--resume`` continues them).
    Returns ``(pruned model, plan, the method's info, example input shape)``; bad options are
    a :class:`CliError`."""
    import torch

    from prunekit import methods

    if not r.data:
        raise CliError(f"--method {r.method} trains the network: pass --data SPEC (digits, cifar10:PATH, ...)")
    work = training_dir(args.out)
    if getattr(args, "resume", False):
        check_resume(str(work))
    loader, val_loader, train_info = training_data(r, args, plan0)
    shape = example_shape(r, model, spec, plan0, train_info)
    device = default_device()
    try:
        res = methods.get(r.method)(model.to(device).eval(), torch.randn(*shape, device=device), loader=loader,
                                    val_loader=val_loader, epochs=r.finetune_epochs,
                                    train_config=train_config(r, finetune=True), run_dir=work,
                                    resume=bool(getattr(args, "resume", False)),
                                    progress=not getattr(args, "no_progress", False), config=prune_options(r))
    except (ValueError, KeyError) as exc:  # PruningError is a ValueError
        raise CliError(str(exc.args[0] if exc.args else exc)) from None
    return res.model.cpu(), method_plan(res, r), res.info, shape
