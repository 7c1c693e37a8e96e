"""``prunekit prune``: prune a model and write it with a before/after report.

Plain criterion pruning or a published method, by ratio or budget, options from flags over a
``--recipe``; the recipe -> :class:`prunekit.PruneConfig` mapping is :func:`prunekit.cli.common.prune_options`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from typing import Any

from prunekit.errors import PruningShortfallWarning

from prunekit.cli.common import (
    DATA_OPTIONS,
    FINETUNE_OPTIONS,
    TRAIN_OPTIONS,
    CliError,
    OptionTable,
    add_model_options,
    add_recipe_options,
    add_trust_code_option,
    add_val_size_option,
    default_ignore,
    example_inputs,
    example_shape,
    load_source,
    method_trains,
    output_dir,
    print_summary,
    profile_report,
    prune_while_training,
    prune_with_recipe,
    resolve_recipe,
    round_to_arg,
    run_meta,
    training_dir,
    write_run,
)


PRUNE_OPTIONS: OptionTable = [
    ("--target-flops", "target_flops", float,
     "fraction of FLOPs to keep, e.g. 0.5 (ratio found by bisection; wins over --ratio)"),
    ("--target-params", "target_params", float, "fraction of parameters to keep, e.g. 0.5"),
    ("--target-latency", "target_latency", float,
     "fraction of the latency to keep, from a per-layer latency table measured on this machine"),
    ("--method", "method", str, "a published method instead of plain criterion pruning: channel_pruning "
     "(LASSO + least squares), cap (compensation, no fine-tuning), ucp, functionality, iterative, svd (low rank), "
     "block_drop (residual blocks), partition (balanced FC partitions run in parallel); or one that trains (slimming, "
     "scp, dais, autopruner, colombo_gao, trp, resconv, pai, ofa: trained on --data for --epochs, checkpointed every "
     "epoch; ofa also writes its cohort of budgets x resolutions to OUT/cohort)"),
    ("--data", "data", str, "data set whose training split calibrates data-driven criteria and methods "
     "(digits, cifar10:PATH, fashion-mnist:PATH, ...)"),
    ("--calib-batches", "calib_batches", int, "calibration batches (training split) for data-driven "
     "criteria and methods"),
    ("--min-channels", "min_channels", int, "every group keeps at least this many channels"),
    ("--partitions", "partitions", int, "--method partition: the number of partitions (parallel workers) each "
     "large fully connected layer is split into (default 2)")]
"""Pruning options beyond the basic ones of ``prune``'s parser (all recipe-backed)."""


def run(args: argparse.Namespace) -> int:
    """``prunekit prune`` with --recipe, --target-flops and saved (trained) model directories."""
    from prunekit.persist import write_model
    from prunekit.runtime import atomic_directory

    if args.ratios is not None:
        try:
            args.ratios = {k: float(v) for k, v in (item.split("=", 1) for item in args.ratios)}
        except ValueError:
            raise CliError(f"--ratios {' '.join(args.ratios)}: expected MODULE=RATIO entries, e.g. layer4=0.7") from None
    r = resolve_recipe(args)
    src = load_source(r, args)
    model, plan0, spec, nc, ic, data_info = src.model, src.plan, src.spec, src.num_classes, src.in_chans, src.data_info
    trains = method_trains(r.method)
    info = None
    t0 = time.perf_counter()
    if trains:  # the data decide the example shape unless --input-shape does
        small, plan, info, shape = prune_while_training(model, r, args, spec, plan0)
    else:
        shape = example_shape(r, model, spec, plan0, data_info)
        if not r.ignore and default_ignore(model):  # a transformers model's task head stays
            r = dataclasses.replace(r, ignore=default_ignore(model))
        with warnings.catch_warnings():  # said once, as a line of the summary below
            warnings.simplefilter("ignore", PruningShortfallWarning)
            small, plan = prune_with_recipe(model.eval(), example_inputs(model, shape), r)
    seconds = time.perf_counter() - t0
    out = output_dir(args.out)  # only once the input is known to be good
    before, after = profile_report(model, shape, args), profile_report(small, shape, args)
    report = {"command": "prune", "model": spec, "input_shape": list(shape), "ratio": plan.meta.get("ratio"),
              "target_flops": r.target_flops, "criterion": r.criterion, "method": r.method, "data": r.data,
              "prune_seconds": seconds, "before": before, "after": after, "plan": plan.meta}
    notes = []
    cohort = None
    if info is not None:
        # A method serving many budgets (ofa) keeps them in a cohort object: saved beside the
        # model as OUT/cohort, not stringified into the report.
        cohort = info.pop("cohort", None)
        report["method_info"] = info
        notes = training_notes(info)
        if cohort is not None:
            notes.append(f"Cohort of {len(info.get('members', []))} members saved in cohort/ "
                         "(prunekit.methods.ofa.OFACohort.load); members in report.json (method_info.members).")
    with atomic_directory(out) as run:  # the whole run replaces --out at once (see prunekit.persist)
        write_model(small, plan, run, model_spec=spec, extra=run_meta(shape, nc, ic))
        write_run(run, r, report, notes=notes, command="prune")
        if cohort is not None:
            cohort.write(run / "cohort", model_spec=spec, extra=run_meta(shape, nc, ic))
        if info is not None and info.get("trajectory"):
            from prunekit.plot import plot_gate_trajectory

            plot_gate_trajectory(info["trajectory"], run / "gates.png", title=f"{r.method}: keep fraction per group")
    if trains:
        import shutil

        shutil.rmtree(training_dir(args.out), ignore_errors=True)  # the run is written: its checkpoints are done
    print_summary([("before", before, {}), ("after", after, {})])
    print(f"{plan_summary(plan)} in {seconds:.2f} s; saved to {out}/ (model.safetensors, plan.json, "
          f"report.json, report.md, recipe.yaml)")
    for line in shortfall_lines(plan) + unprunable_lines(plan):
        print(line, file=sys.stderr)
    return 0


def unprunable_lines(plan: Any, top: int = 3) -> list[str]:
    """``note: ...`` lines on the channels that had to stay (``plan.meta["unprunable"]``): the
    share of the parameters they hold and the ``top`` reasons (which op, what share), leaving
    out the modules the user asked to keep (``ignore``). Empty when nothing else stays."""
    held = plan.meta.get("unprunable") or {}
    reasons = [r for r in held.get("reasons", []) if not r["ignored"]]
    if not reasons:
        return []
    lines = [f"prunekit prune: note: {100 * held['params_share']:.1f}% of the parameters touch channels that "
             "cannot be pruned (report.json: plan.unprunable); the largest causes:"]
    for r in reasons[:top]:
        lines.append(f"  {100 * r['params_share']:.1f}% of the parameters, {r['channels']} channels "
                     f"({', '.join(r['groups'][:2])}{', ...' if len(r['groups']) > 2 else ''}): {r['reason']}")
    return lines


def shortfall_lines(plan: Any) -> list[str]:
    """``warning: ...`` lines for a prune that did less than asked (``plan.meta["shortfall"]``,
    a ``--round-to auto`` that found no faster multiple): empty when it did what was asked."""
    lines = []
    if plan.meta.get("shortfall"):
        lines.append(f"prunekit prune: warning: {plan.meta['shortfall']}")
    auto = plan.meta.get("round_to_auto")
    if isinstance(auto, dict) and auto.get("warning"):
        lines.append(f"prunekit prune: warning: {auto['warning']}")
    return lines


def plan_summary(plan: Any) -> str:
    """One line on what a plan did: groups pruned (channel steps) and layers replaced or dropped."""
    from prunekit.plan import Drop, Replace

    parts = []
    if plan.meta.get("groups_pruned") or not any(isinstance(st, (Replace, Drop)) for st in plan.steps):
        parts.append(f"pruned {plan.meta.get('groups_pruned', 0)}/{plan.meta.get('groups', 0)} groups "
                     f"(ratio {plan.meta.get('ratio', 0):.3f})")
    replaced = sum(isinstance(st, Replace) for st in plan.steps)
    dropped = sum(isinstance(st, Drop) for st in plan.steps)
    if replaced:
        parts.append(f"replaced {replaced} layer{'s' if replaced > 1 else ''}")
    if dropped:
        parts.append(f"dropped {dropped} module{'s' if dropped > 1 else ''}")
    return ", ".join(parts)


def training_notes(info: dict) -> list[str]:
    """Report lines of a training method: epochs, the budget reached and expected, the groups
    scored otherwise than the method's name says, the indicators' binarisation."""
    b = info.get("budget", {})
    lines = [f"Trained {info.get('train', {}).get('epochs')} epoch(s) with `{info.get('method')}`"
             + (f" (resumed from epoch {info['train']['resumed_from_epoch']})"
                if info.get("train", {}).get("resumed_from_epoch") else "") + "."]
    if b:
        def num(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, (int, float)) else "n/a"

        line = f"Budget: {b.get('kind')} target {num(b.get('target'))}, selected {num(b.get('selected'))}"
        if "expected_end" in b:
            line += f", expected at the end of training {num(b['expected_end'])}"
        lines.append(line + f"; measured FLOPs {num(b.get('measured_flops'))} of the original.")
    for key in ("logit_groups", "criterion_fallbacks"):
        if info.get(key):
            lines.append(f"{key.replace('_', ' ')}: {', '.join(map(str, info[key]))}")
    if "binary_fraction" in info:
        lines.append(f"Indicators within 0.01 of 0 or 1 at the end: {100 * info['binary_fraction']:.1f}% "
                     f"(data: {info.get('indicator_data')}).")
    if info.get("trajectory"):
        lines.append("Keep fraction per group over training: gates.png; per epoch in report.json (method_info.trajectory).")
    return lines


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``prune`` on the CLI's sub-parser set."""
    # Recipe-backed options default to None: a --recipe fills them, flags given override it.
    p = sub.add_parser("prune", help="prune a model and write it with a before/after report")
    add_model_options(p, model_required=False)
    p.add_argument("--recipe", default=None, help="YAML recipe file or packaged recipe name; flags override it")
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of channels removed from every group, 0 <= r < 1 (default 0.5)")
    p.add_argument("--criterion", default=None, help="importance criterion: l1, l2 (default), l1_out, bn, random, ...")
    p.add_argument("--ignore", nargs="*", default=None, help="module names whose output channels must stay")
    p.add_argument("--ratios", nargs="*", default=None, help="per-module ratios, e.g. layer4=0.7")
    p.add_argument("--global-ranking", action="store_true", default=None,
                   help="rank channels across groups (normalised scores)")
    p.add_argument("--allocation", choices=("ratio", "knapsack"), default=None,
                   help="how a --target-* budget is shared among groups: one ratio bisected to it (default) or "
                        "knapsack (the channels that save the most of it per importance lost)")
    p.add_argument("--round-to", type=round_to_arg, default=None,
                   help="keep channel counts multiples of this (default 1); auto: the multiple (1, 4, 8, 16, 32) whose "
                        "pruned model runs fastest per FLOP kept here, timed per layer on --round-backend, never "
                        "one estimated slower than the original (plan.meta['round_to_auto'] records the estimates)")
    p.add_argument("--round-backend", choices=("eager", "onnxruntime"), default=None,
                   help="what --round-to auto times on: PyTorch eager on the model's device (default) or ONNX Runtime "
                        "(CPU)")
    p.add_argument("--out", required=True, help="output directory (created; existing files are replaced atomically)")
    add_recipe_options(p, PRUNE_OPTIONS)
    # Training methods (slimming, scp, dais): the options of a fine-tune, which their training is.
    add_recipe_options(p, FINETUNE_OPTIONS + [o for o in TRAIN_OPTIONS if o[1] not in ("epochs", "lr")]
                       + [o for o in DATA_OPTIONS if o[1] in ("image_size", "subset", "workers")])
    add_val_size_option(p, "; a training method trains its indicators or reports on them (dais: without it, on "
                        "every other training batch)")
    p.add_argument("--resume", action="store_true", help="continue a training method's run killed before it was "
                   "written (its checkpoints are kept in .OUT.training beside --out until then)")
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bars")
    add_trust_code_option(p)
    p.set_defaults(func=run)
