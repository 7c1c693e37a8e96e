"""``prunekit graph``: the coupled channel groups of a model and why some channels cannot be pruned."""

from __future__ import annotations

import argparse

from prunekit.cli.common import add_model_options, example_inputs, model_from_spec, resolve_input_shape


def run(args: argparse.Namespace) -> int:
    """Print the coupled channel groups of a model and why some channels cannot be pruned."""
    import prunekit as pk

    model = model_from_spec(args.model, args.num_classes, args.in_chans).eval()
    shape = resolve_input_shape(args.input_shape, model, args.model)
    graph = pk.trace(model, example_inputs(model, shape))
    print(graph)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``graph`` on the CLI's sub-parser set."""
    p = sub.add_parser("graph", help="show the coupled channel groups of a model")
    add_model_options(p)
    p.set_defaults(func=run)
