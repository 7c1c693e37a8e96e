"""``prunekit profile``: params, FLOPs and measured latency of a model or a saved pruned model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prunekit.cli.common import (add_model_options, add_trust_code_option, example_inputs, load_model, model_from_spec,
                                 resolve_input_shape)


def run(args: argparse.Namespace) -> int:
    """Print params, FLOPs and measured latency of a model (or of a saved pruned model)."""
    import prunekit as pk

    if args.model and Path(args.model).is_dir():
        model, plan = load_model(args.model, num_classes=None, in_chans=None, trust_code=args.trust_code)
        spec, saved = plan.meta.get("model_spec", ""), plan.meta.get("input_shape")
    else:
        model = model_from_spec(args.model, args.num_classes, args.in_chans)
        spec, saved = args.model, None
    model.eval()
    # A saved run is profiled at the input shape it was made with (as eval does): its model
    # may take 1 channel, which no default shape can know.
    shape = tuple(saved) if saved and not args.input_shape else resolve_input_shape(args.input_shape, model, spec)
    prof = pk.profile(model, example_inputs(model, shape), latency=not args.no_latency, threads=args.threads)
    print(json.dumps(prof.to_dict(), indent=1) if args.json else prof)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``profile`` on the CLI's sub-parser set."""
    p = sub.add_parser("profile", help="params, FLOPs and measured latency of a model or a saved pruned model")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_options(p)
    add_trust_code_option(p)
    p.set_defaults(func=run)
