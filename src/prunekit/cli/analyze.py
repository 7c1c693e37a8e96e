"""``prunekit analyze`` sub-commands: analyses of a model's pruning criteria.

``prunekit analyze criteria`` scores every channel group with several criteria and writes
how similar their rankings are, how well each separates channels and whether the layers'
weights look Gaussian (see :mod:`prunekit.analyze.criteria`). Models, saved directories,
data sets and input shapes are resolved by the same helpers as the other commands
(:mod:`prunekit.cli.common`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from prunekit.cli.common import CliError, example_shape, load_data, load_model, output_dir, resolve_recipe


def _criteria(text: str | None, have_data: bool) -> list[str] | None:
    """The criteria named by ``--criteria`` (None: the defaults), checked against the registry."""
    from prunekit.criteria import DATA_CRITERIA, list_criteria

    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise CliError(f"--criteria {text!r}: expected comma-separated names like l1,l2,fpgm")
    known = list_criteria()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CliError(f"--criteria {text}: unknown criterion {', '.join(repr(n) for n in unknown)}; "
                   f"available: {', '.join(known)}")
    needs = [n for n in names if n in DATA_CRITERIA]
    if needs and not have_data:
        raise CliError(f"--criteria {text}: {', '.join(needs)} need calibration data; pass --dataset NAME [--data PATH]")
    return names


def _data_spec(dataset: str | None, data: str | None) -> str | None:
    """The data-set spec ``NAME[:PATH]`` from ``--dataset`` and ``--data`` (None: no data)."""
    from prunekit.zoo import DATASET_NAMES

    if dataset is None:
        if data is None:
            return None
        name = data.partition(":")[0].strip().lower().replace("_", "-")
        if ":" in data and name in DATASET_NAMES:
            return data  # the NAME:PATH form the other commands take
        raise CliError(f"--data {data}: name the data set with --dataset NAME ({', '.join(DATASET_NAMES)}) "
                   "or pass --data NAME:PATH")
    name = dataset.strip().lower().replace("_", "-")
    if name not in DATASET_NAMES:
        raise CliError(f"--dataset {dataset}: unknown data set; valid names: {', '.join(DATASET_NAMES)}")
    if data is None:
        if name in ("digits", "fashion-mnist"):
            return name  # embedded / installed at a default place
        raise CliError(f"--data: data set {name} needs a path; pass --data PATH (e.g. a .npz or a torchvision folder)")
    return f"{name}:{data}"


def run_criteria(args: argparse.Namespace) -> int:
    """Run :func:`prunekit.analyze.criteria_report` on a model and write json, md and png into ``--out``."""
    import torch

    from prunekit.analyze import criteria_report, write_report
    from prunekit.errors import PruningError
    from prunekit.zoo import make_loader

    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CliError(f"{flag} {value}: must be >= 1")
    if not 0.0 < args.alpha < 1.0:
        raise CliError(f"--alpha {args.alpha}: must be in (0, 1)")
    spec = _data_spec(args.dataset, args.data)
    names = _criteria(args.criteria, spec is not None)
    # The shared recipe resolver checks sizes and seeds and feeds load_data/example_shape.
    flags = argparse.Namespace(data=spec, input_shape=args.input_shape, num_classes=args.num_classes,
                               in_chans=args.in_chans, image_size=args.image_size, seed=args.seed,
                               batch_size=args.batch_size, augment=False)
    r = resolve_recipe(flags)
    if args.weights and Path(args.model).expanduser().is_dir():
        raise CliError(f"--weights {args.weights}: --model {args.model} is a saved directory with its own weights")
    info = load_data(r, args.split) if spec else None
    model, plan = load_model(args.model, num_classes=r.num_classes or (info.num_classes if info else None),
                             in_chans=r.in_chans or (info.in_chans if info else None), weights=args.weights)
    model = model.cpu().eval()
    model_spec = plan.meta.get("model_spec", args.model) if plan is not None else args.model
    shape = example_shape(r, model, model_spec, plan, info)
    loader = make_loader(info, batch_size=r.batch_size, shuffle=True, seed=r.seed) if info is not None else None
    gen = torch.Generator().manual_seed(r.seed)
    try:
        report = criteria_report(model, torch.randn(*shape, generator=gen), criteria=names, loader=loader,
                                 batches=args.batches, ignore=args.ignore or None, alpha=args.alpha, seed=r.seed)
    except PruningError as exc:
        flag = "--ignore" if "ignore" in str(exc) else "--model"
        raise CliError(f"{flag}: {exc}") from None
    # The report names the model by its spec and the data it used, not by the class alone.
    report = dataclasses.replace(report, meta={**report.meta, "model": model_spec, "data": spec,
                                               "input_shape": list(shape),
                                               "batch_size": r.batch_size if loader is not None else None})
    out = output_dir(args.out)
    paths = write_report(report, out)
    c = report.criteria
    pairs = [(a, b) for i, a in enumerate(c) for b in c[i + 1:]]
    best = ", ".join(f"{a}-{b} {_num(report.correlation(a, b))}" for a, b in pairs[:4])
    frac = "n/a" if report.gaussian_fraction is None else f"{100 * report.gaussian_fraction:.0f}%"
    print(f"analysed {len(report.groups)} channel groups of {model_spec} with {len(c)} criteria "
          f"({', '.join(c)}){f' on {spec}' if spec else ''}\nmean Spearman: {best}{', ...' if len(pairs) > 4 else ''}\n"
          f"{frac} of {report.n_layers} producing layers look Gaussian (alpha {args.alpha:g})\n"
          f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _num(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``prunekit analyze`` (with its ``criteria`` analysis) on the CLI's sub-parser set."""
    from prunekit.analyze import DATA_DRIVEN_DEFAULT, DATA_FREE_CRITERIA

    p = sub.add_parser("analyze", help="analyse a model's pruning criteria (agreement, spread, weight shape)",
                       description="Analyses that help choose how to prune a model.")
    analyses = p.add_subparsers(dest="analysis", required=True)
    c = analyses.add_parser(
        "criteria", help="rank agreement of pruning criteria, their distinguishability, and weight normality",
        description="Score every channel group of the model with several pruning criteria and write "
        "criteria_report.json, criteria_report.md and criteria_heatmap.png into --out: Spearman and Kendall rank "
        "correlations between criteria (per group and averaged), how well each criterion separates channels, and "
        "normality tests of each producing layer's weights (Huang et al., NeurIPS 2021).")
    c.add_argument("--model", required=True, help="model: a zoo name (resnet20), torchvision:NAME, timm:NAME, "
                   "path/to/file.py:build_fn, or a directory saved by prunekit (e.g. the output of prunekit train)")
    c.add_argument("--weights", default=None, help="state-dict file (.pt/.safetensors) for a --model spec")
    c.add_argument("--dataset", default=None, help="calibration data set for the data-driven criteria: digits, "
                   "cifar10, cifar100, mnist, fashion-mnist, npz, imagefolder (default: none, weight criteria only)")
    c.add_argument("--data", default=None, help="path of the --dataset (a .npz or a folder; digits needs none)")
    c.add_argument("--split", default="train", choices=("train", "test"), help="split used for calibration (default train)")
    c.add_argument("--batches", type=int, default=8, help="calibration batches for data-driven criteria (default 8)")
    c.add_argument("--batch-size", type=int, default=64, help="calibration batch size (default 64)")
    c.add_argument("--criteria", default=None,
                   help=f"comma-separated criteria (default {','.join(DATA_FREE_CRITERIA)}, plus "
                   f"{','.join(DATA_DRIVEN_DEFAULT)} with --dataset)")
    c.add_argument("--ignore", nargs="*", default=None, help="module names whose output channels are left out")
    c.add_argument("--input-shape", default=None,
                   help="example input shape, batch first, e.g. 1,3,32,32 (default: from the data or saved model)")
    c.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the data set's or model's)")
    c.add_argument("--in-chans", type=int, default=None, help="input channels (default: the data set's or model's)")
    c.add_argument("--image-size", type=int, default=None, help="resize images to this size (default: the data set's)")
    c.add_argument("--alpha", type=float, default=0.05, help="significance level of the normality tests (default 0.05)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration order and the Shapiro sample (default 0)")
    c.add_argument("--out", required=True, help="output directory (created; the three files are replaced atomically)")
    c.set_defaults(func=run_criteria)
