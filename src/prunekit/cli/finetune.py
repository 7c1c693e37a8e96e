"""``prunekit finetune``: fine-tune a saved pruned model, optionally distilling from a teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.cli.common import (
    DATA_OPTIONS,
    FINETUNE_OPTIONS,
    SHAPE_OPTIONS,
    TRAIN_OPTIONS,
    CliError,
    OptionTable,
    accuracy,
    add_recipe_options,
    add_run_options,
    add_trust_code_option,
    check_in_chans,
    check_resume,
    default_device,
    distributed,
    example_shape,
    load_data,
    load_model,
    make_loaders,
    output_dir,
    pct,
    profile_report,
    resolve_recipe,
    train_config,
    write_run,
)


KD_OPTIONS: OptionTable = [
    ("--kd-alpha", "kd_alpha", float, "weight of the distillation term (0..1) when a teacher is used"),
    ("--kd-temperature", "kd_temperature", float, "distillation temperature")]
"""Distillation options (recipe-backed), used when ``--teacher`` is given."""


@distributed
def run(args: argparse.Namespace) -> int:
    """Fine-tune a saved pruned model (optionally distilling from a teacher) and save it with the same plan."""
    from prunekit.persist import write_model
    from prunekit.recover import is_main_process, train
    from prunekit.runtime import atomic_directory

    r = resolve_recipe(args)
    if not Path(args.pruned).expanduser().is_dir():
        raise CliError(f"--pruned {args.pruned}: not a directory saved by prunekit (model.safetensors + plan.json)")
    if args.resume:
        check_resume(args.out)
    train_info, test_info = load_data(r, "train", r.subset), load_data(r, "test")
    model, plan = load_model(args.pruned, num_classes=None, in_chans=None, flag="--pruned", trust_code=args.trust_code)
    teacher = None
    if args.teacher:
        teacher, _ = load_model(args.teacher, num_classes=r.num_classes or train_info.num_classes,
                                in_chans=r.in_chans or train_info.in_chans, flag="--teacher", weights=args.teacher_weights,
                                trust_code=args.trust_code)
    check_in_chans(r, train_info, plan, f"saved in --pruned {args.pruned}")
    shape = example_shape(r, model, plan.meta.get("model_spec", ""), plan, train_info)
    out, main = output_dir(args.out), is_main_process()
    train_loader, test_loader = make_loaders(r, train_info, test_info)
    dev = default_device()
    before = accuracy(model.to(dev), test_loader)
    if main:
        print(f"prunekit finetune: {args.pruned} on {r.data}, {r.finetune_epochs} epoch(s)"
              f"{f', distilling from {args.teacher}' if teacher is not None else ''}; test top-1 now {pct(before['top1'])}")
    res = train(model, train_loader, train_config(r, finetune=True), teacher=teacher.to(dev) if teacher is not None else None,
                run_dir=out, resume=args.resume, progress=not args.no_progress)
    after = accuracy(model, test_loader)
    if not main:
        return 0
    prof = profile_report(model, shape, args)
    with atomic_directory(out) as run:  # the whole run replaces --out at once (see prunekit.persist)
        write_model(model, plan, run)
        write_run(run, r, {"command": "finetune", "model": plan.meta.get("model_spec"), "pruned": str(args.pruned),
                           "teacher": args.teacher, "data": r.data, "input_shape": list(shape),
                           "before": {**prof, **before}, "after": {**prof, **after}, "plan": plan.meta,
                           "finetune": {"seconds": res.wall_time_s, "epochs": res.epochs_completed,
                                        "history": res.history}}, command="finetune")
    print(f"test top-1 {pct(before['top1'])} -> {pct(after['top1'])} ({res.wall_time_s:.1f} s); saved {out}/ "
          f"(model.safetensors, plan.json, report.md, recipe.yaml, checkpoint.pt)")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``finetune`` on the CLI's sub-parser set."""
    p = sub.add_parser("finetune", help="fine-tune a pruned model, optionally distilling from a teacher",
                       description="Load a pruned model saved by prunekit (prune/demo/finetune output), fine-tune it "
                       "and save it with the same plan and new weights, with accuracy before/after in the report.")
    p.add_argument("--pruned", required=True, help="directory of the pruned model (model.safetensors + plan.json)")
    p.add_argument("--teacher", default=None, help="teacher for distillation: a saved directory (e.g. the prunekit "
                   "train output) or a model spec with --teacher-weights (default: no distillation)")
    p.add_argument("--teacher-weights", default=None, help="state-dict file (.pt/.safetensors) for a --teacher spec")
    add_run_options(p)
    add_recipe_options(p, DATA_OPTIONS + FINETUNE_OPTIONS + [o for o in TRAIN_OPTIONS if o[1] not in ("epochs", "lr")]
                       + KD_OPTIONS + SHAPE_OPTIONS)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly; refused when OUT "
                   "has no readable checkpoint.pt (nothing is trained or written)")
    add_trust_code_option(p)
    p.set_defaults(func=run)
