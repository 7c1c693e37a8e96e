"""``prunekit demo``: train, prune and fine-tune small_cnn on the embedded digits, with a report."""

from __future__ import annotations

import argparse
import time

from prunekit.cli.common import (
    accuracy,
    add_run_options,
    default_device,
    example_shape,
    load_data,
    load_model,
    make_loaders,
    output_dir,
    pct,
    print_summary,
    profile_report,
    prune_with_recipe,
    resolve_recipe,
    run_meta,
    train_config,
    write_run,
)


def run(args: argparse.Namespace) -> int:
    """Train small_cnn on the embedded digits, prune to ~half the FLOPs, fine-tune with KD, report."""
    import torch

    import prunekit as pk
    from prunekit.measure import human
    from prunekit.persist import write_model
    from prunekit.plan import PruningPlan
    from prunekit.plot import plot_accuracy_vs_flops
    from prunekit.recipe import load_recipe
    from prunekit.recover import train
    from prunekit.runtime import atomic_directory

    t_start = time.perf_counter()
    r = resolve_recipe(args, base=load_recipe("digits_demo"))
    train_info, test_info = load_data(r, "train", r.subset), load_data(r, "test")
    train_loader, test_loader = make_loaders(r, train_info, test_info)
    nc, ic = r.num_classes or train_info.num_classes, r.in_chans or train_info.in_chans
    torch.manual_seed(r.seed)  # the initial weights depend on --seed only
    model, _ = load_model(r.model or "", num_classes=nc, in_chans=ic)
    shape = example_shape(r, model, r.model or "", None, train_info)
    out, dev = output_dir(args.out), default_device()
    print(f"prunekit demo: {r.model} on {r.data} ({len(train_info)} train / {len(test_info)} test images, "
          f"{shape[2]}x{shape[3]}), device {dev}, output {out}/")

    print(f"[1/4] training {r.model} for {r.epochs} epochs ({r.optimizer}, lr {r.lr:g}, {r.schedule})")
    res = train(model.to(dev), train_loader, train_config(r, finetune=False), run_dir=out / "baseline",
                progress=not args.no_progress)
    base = accuracy(model, test_loader)
    pk.save(model.cpu(), PruningPlan(), out / "baseline", model_spec=r.model, extra=run_meta(shape, nc, ic))
    print(f"      {res.wall_time_s:.1f} s, test top-1 {pct(base['top1'])}; baseline saved to {out / 'baseline'}/")

    goal = f"keep {r.target_flops:.0%} of the FLOPs" if r.target_flops else f"ratio {r.ratio}"
    print(f"[2/4] pruning ({goal}, criterion {r.criterion})")
    x = torch.zeros(*shape)
    t0 = time.perf_counter()
    small, plan = prune_with_recipe(model.cpu().eval(), x, r)
    prune_s = time.perf_counter() - t0
    pruned = accuracy(small, test_loader)
    m = plan.meta
    print(f"      pruned {m.get('groups_pruned')}/{m.get('groups')} channel groups, removed {m.get('channels_removed')}/"
          f"{m.get('channels')} channels (ratio {m.get('ratio', 0):.3f}) in {prune_s:.2f} s; "
          f"FLOPs {human(pk.measure.count_flops(model, x))} -> {human(pk.measure.count_flops(small, x))}; "
          f"test top-1 before fine-tuning {pct(pruned['top1'])}")

    print(f"[3/4] fine-tuning for {r.finetune_epochs} epochs with distillation from the unpruned model "
          f"(alpha {r.kd_alpha:g}, T {r.kd_temperature:g})")
    res_ft = train(small.to(dev), train_loader, train_config(r, finetune=True), teacher=model.to(dev),
                   run_dir=out / "finetune", progress=not args.no_progress)
    after = accuracy(small, test_loader)
    print(f"      {res_ft.wall_time_s:.1f} s, test top-1 {pct(after['top1'])}")

    print("[4/4] measuring params, FLOPs" + ("" if args.no_latency else " and batch-1 CPU latency"))
    before_p, after_p = profile_report(model, shape, args), profile_report(small, shape, args)
    points = [{"label": "original", "flops": before_p["flops"], **base},
              {"label": "pruned", "flops": after_p["flops"], **pruned},
              {"label": "pruned + fine-tuned", "flops": after_p["flops"], **after}]
    report = {"command": "demo", "model": r.model, "data": r.data, "input_shape": list(shape),
              "before": {**before_p, **base}, "pruned": {"params": after_p["params"], "flops": after_p["flops"], **pruned},
              "after": {**after_p, **after}, "plan": plan.meta, "prune_seconds": prune_s,
              "train": {"seconds": res.wall_time_s, "epochs": res.epochs_completed, "final": res.final},
              "finetune": {"seconds": res_ft.wall_time_s, "epochs": res_ft.epochs_completed, "final": res_ft.final},
              "wall_seconds": time.perf_counter() - t_start}
    with atomic_directory(out) as run:  # the whole run replaces OUT at once; baseline/ and finetune/ are carried over
        write_model(small, plan, run, model_spec=r.model, extra=run_meta(shape, nc, ic))
        plot_accuracy_vs_flops(points, run / "accuracy_vs_flops.png", title=f"{r.model} on {r.data}")
        write_run(run, r, report, [f"Pruned, before fine-tuning: top1 {pruned['top1']:.4f}, top5 {pruned['top5']:.4f}, "
                                   f"loss {pruned['loss']:.4f}.", "![accuracy vs FLOPs](accuracy_vs_flops.png)"], "demo")
    print_summary([("original", before_p, base), ("pruned", after_p, pruned), ("pruned + fine-tuned", after_p, after)])
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s. Saved in {out}/:\n"
          f"  model.safetensors, plan.json  pruned + fine-tuned model: prunekit.load('{out}')\n"
          f"  baseline/                     unpruned trained model (+ checkpoint, train log)\n"
          f"  finetune/                     fine-tuning checkpoint and log\n"
          f"  report.md, report.json        before/after figures\n"
          f"  accuracy_vs_flops.png         accuracy vs FLOPs plot\n"
          f"  recipe.yaml                   every option used (prunekit demo --recipe {out}/recipe.yaml reruns it)")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo`` on the CLI's sub-parser set (help defaults from the digits_demo recipe)."""
    from prunekit.recipe import load_recipe

    demo = load_recipe("digits_demo")
    p = sub.add_parser("demo", help="train, prune and fine-tune small_cnn on the embedded digits (CPU, < 1 min)",
                       description="The end-to-end demo: train small_cnn on scikit-learn's digits (upsampled to 16x16), "
                       "prune it to about half its FLOPs, fine-tune it with distillation from the unpruned model, "
                       "measure accuracy, params, FLOPs and latency before/after, and save the model, a report, "
                       "the resolved recipe and an accuracy-vs-FLOPs plot. Defaults come from the packaged "
                       "recipe digits_demo.yaml. Needs no download.")
    add_run_options(p, out="runs/demo")
    p.add_argument("--epochs", dest="epochs", type=int, default=None, help=f"training epochs (default {demo['epochs']})")
    p.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, default=None,
                   help=f"fine-tuning epochs after pruning (default {demo['finetune_epochs']})")
    p.add_argument("--target-flops", dest="target_flops", type=float, default=None,
                   help=f"fraction of FLOPs the pruned model keeps, in (0, 1] (default {demo['target_flops']})")
    p.add_argument("--seed", dest="seed", type=int, default=None, help=f"random seed (default {demo.get('seed', 0)})")
    p.set_defaults(func=run)
