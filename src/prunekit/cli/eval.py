"""``prunekit eval``: accuracy, loss, params, FLOPs, latency and throughput of a model on a data split (JSON)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from prunekit.cli.common import (
    DATA_OPTIONS,
    MODEL_HELP,
    SHAPE_OPTIONS,
    TRAIN_OPTIONS,
    CliError,
    accuracy,
    add_recipe_options,
    add_trust_code_option,
    add_val_size_option,
    check_in_chans,
    default_device,
    example_shape,
    load_data,
    load_model,
    positive_int,
    resolve_recipe,
)


def run(args: argparse.Namespace) -> int:
    """Print JSON with top-1/top-5/loss on a split plus params, FLOPs, latency and throughput."""
    import torch

    from prunekit.measure import count_flops, count_params, measure_latency
    from prunekit.zoo import make_loader

    r = resolve_recipe(args)
    if args.latency_batch < 1:
        raise CliError(f"--latency-batch {args.latency_batch}: must be >= 1")
    info = load_data(r, args.split, r.subset, val_size=args.val_size)
    model, plan = load_model(args.model, num_classes=r.num_classes or info.num_classes,
                             in_chans=r.in_chans or info.in_chans, weights=args.weights,
                             trust_code=args.trust_code)
    check_in_chans(r, info, plan, f"saved in --model {args.model}" if plan is not None else "from --in-chans")
    model = model.to(default_device()).eval()
    loader = make_loader(info, batch_size=r.eval_batch_size, shuffle=False, seed=r.seed, num_workers=r.workers)
    result: dict[str, Any] = {"model": args.model, "data": r.data, "split": args.split, "images": len(info)}
    result.update(accuracy(model, loader))
    model = model.cpu()
    x = torch.randn(*example_shape(r, model, args.model, plan, info))
    result.update(params=count_params(model), flops=count_flops(model, x), input_shape=list(x.shape))
    if not args.no_latency:
        for b in (1, args.latency_batch):
            lat = measure_latency(model, x.expand(b, *x.shape[1:]).contiguous(), threads=args.threads)
            result[f"latency_batch{b}"] = {"median_ms": lat.median_ms, "iqr_ms": lat.iqr_ms,
                                           "images_per_s": lat.throughput, "threads": lat.threads}
    print(json.dumps(result, indent=1))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``eval`` on the CLI's sub-parser set."""
    p = sub.add_parser("eval", help="accuracy, loss, latency and throughput of a model on a data split (JSON)",
                       description="Evaluate top-1/top-5/loss on a split and measure params, FLOPs and CPU latency "
                       "at batch 1 and --latency-batch; prints JSON.")
    p.add_argument("--model", required=True, help=MODEL_HELP + ", or a directory saved by prunekit")
    p.add_argument("--weights", default=None, help="state-dict file (.pt/.safetensors) for a --model spec")
    p.add_argument("--split", default="test", choices=("train", "test", "val"), help="data split (default test); 'val' is --val-size images held out of train")
    add_val_size_option(p, "")
    p.add_argument("--recipe", default=None, help="YAML recipe (for data, sizes); flags override it")
    add_recipe_options(p, DATA_OPTIONS + [o for o in TRAIN_OPTIONS if o[1] == "seed"] + SHAPE_OPTIONS)
    p.add_argument("--latency-batch", type=int, default=64, help="the larger batch size for latency/throughput (default 64)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for latency measurement (default: torch's)")
    add_trust_code_option(p)
    p.set_defaults(func=run)
