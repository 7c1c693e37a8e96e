"""``prunekit train``: baseline training (resumable checkpoints; works under torchrun)."""

from __future__ import annotations

import argparse

from prunekit.cli.common import (
    DATA_OPTIONS,
    MODEL_HELP,
    SHAPE_OPTIONS,
    TRAIN_OPTIONS,
    CliError,
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
    run_meta,
    train_config,
    write_run,
)


@distributed
def run(args: argparse.Namespace) -> int:
    """Train a model from scratch (resumable, torchrun-aware) and save it with an empty plan."""
    import torch

    from prunekit.persist import write_model
    from prunekit.plan import PruningPlan
    from prunekit.recover import get_world_size, is_main_process, train
    from prunekit.runtime import atomic_directory

    r = resolve_recipe(args)
    if not r.model:
        raise CliError("no model: pass --model SPEC or set model: in the recipe")
    if args.resume:
        check_resume(args.out)
    train_info, test_info = load_data(r, "train", r.subset), load_data(r, "test")
    nc, ic = r.num_classes or train_info.num_classes, r.in_chans or train_info.in_chans
    torch.manual_seed(r.seed)  # the initial weights depend on --seed only
    model, plan = load_model(r.model, num_classes=nc, in_chans=ic, trust_code=args.trust_code)
    check_in_chans(r, train_info, plan, f"saved in --model {r.model}" if plan is not None else "from --in-chans")
    shape = example_shape(r, model, r.model, plan, train_info)
    out, main = output_dir(args.out), is_main_process()
    train_loader, test_loader = make_loaders(r, train_info, test_info)
    if main:
        print(f"prunekit train: {r.model} on {r.data} ({len(train_info)} images, {r.epochs} epoch(s), "
              f"{get_world_size()} process(es)) -> {out}/")
    res = train(model.to(default_device()), train_loader, train_config(r, finetune=False), run_dir=out, resume=args.resume,
                progress=not args.no_progress)
    acc = accuracy(model, test_loader)
    if not main:
        return 0
    spec = plan.meta.get("model_spec", r.model) if plan is not None else r.model
    prof = profile_report(model, shape, args)
    with atomic_directory(out) as run:  # the whole run replaces --out at once; checkpoint.pt is carried over
        write_model(model, plan or PruningPlan(), run, model_spec=None if plan is not None else spec,
                    extra=run_meta(shape, nc, ic))
        write_run(run, r, {"command": "train", "model": spec, "data": r.data, "input_shape": list(shape), "before": {},
                           "after": {**prof, **acc}, "train": {"seconds": res.wall_time_s,
                           "epochs": res.epochs_completed, "resumed_from_epoch": res.resumed_from_epoch,
                           "history": res.history}}, command="train")
    print(f"trained {res.epochs_completed} epoch(s) ({res.wall_time_s:.1f} s this run): test top-1 {pct(acc['top1'])}, "
          f"top-5 {pct(acc['top5'])}, loss {acc['loss']:.4f}\nsaved {out}/model.safetensors + plan.json "
          f"(prunekit.load('{out}')), checkpoint.pt, train_log.jsonl, report.md, recipe.yaml")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``train`` on the CLI's sub-parser set."""
    p = sub.add_parser("train", help="train a model (resumable checkpoints; works under torchrun)",
                       description="Baseline training. A checkpoint is written after every epoch (--resume continues "
                       "it exactly); the final weights are saved as model.safetensors + plan.json so that "
                       "prunekit.load(OUT) and prunekit prune --model OUT work. Under torchrun only rank 0 writes.")
    p.add_argument("--model", dest="model", default=None, help=MODEL_HELP + " (recipe key model)")
    add_run_options(p)
    add_recipe_options(p, DATA_OPTIONS + TRAIN_OPTIONS + SHAPE_OPTIONS)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly; refused when OUT "
                   "has no readable checkpoint.pt (nothing is trained or written)")
    add_trust_code_option(p)
    p.set_defaults(func=run)
