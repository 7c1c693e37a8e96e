"""``prunekit export``: ONNX export checked against PyTorch with onnxruntime."""

from __future__ import annotations

import argparse
import sys

from prunekit.cli.common import (
    DATA_OPTIONS,
    MODEL_HELP,
    SHAPE_OPTIONS,
    CliError,
    add_recipe_options,
    add_trust_code_option,
    example_inputs,
    example_shape,
    load_model,
    resolve_recipe,
)


def run(args: argparse.Namespace) -> int:
    """Export to ONNX and check the outputs against PyTorch with onnxruntime."""
    from prunekit.export import OnnxCheckError, check_destination, export_onnx, supported_opsets

    r = resolve_recipe(args)
    opsets = supported_opsets()
    if opsets is not None and args.opset not in opsets:
        raise CliError(f"--opset {args.opset}: this torch exports opsets {opsets.start} to {opsets.stop - 1}")
    try:  # before the model is even loaded: a bad --out fails at once, not after the export
        check_destination(args.out)
    except ValueError as exc:
        raise CliError(f"--out {exc}") from None
    model, plan = load_model(args.model, num_classes=r.num_classes, in_chans=r.in_chans, trust_code=args.trust_code)
    spec = plan.meta.get("model_spec", args.model) if plan is not None else args.model
    shape = example_shape(r, model, spec, plan)
    try:
        fig = export_onnx(model, example_inputs(model, shape), args.out, opset=args.opset, atol=args.atol)
    except ImportError as exc:
        raise CliError(str(exc)) from None
    except OnnxCheckError as exc:
        print(f"prunekit export: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {fig['path']} ({fig['bytes'] / 1e6:.2f} MB, opset {fig['opset']}, {fig['exporter']} exporter, "
          f"input {list(shape)} with dynamic batch)\nonnxruntime check: max abs diff {fig['max_abs_diff']:.3g} "
          f"(tolerance {fig['atol']:g} + {fig['rtol']:g}*|y|): outputs match")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``export`` on the CLI's sub-parser set."""
    p = sub.add_parser("export", help="export to ONNX and check it against PyTorch with onnxruntime",
                       description="Write an ONNX file (dynamic batch axis) and compare onnxruntime's output with "
                       "PyTorch's on a random input; exits 1 if they differ. Needs pip install 'prunekit[export]'.")
    p.add_argument("--model", required=True, help=MODEL_HELP + ", or a directory saved by prunekit")
    p.add_argument("--out", required=True, help="the .onnx file to write (replaced atomically, only if the check passes)")
    add_recipe_options(p, [o for o in DATA_OPTIONS if o[1] in ("num_classes", "in_chans")] + SHAPE_OPTIONS)
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of the check, plus 1e-3 relative (default 1e-4)")
    add_trust_code_option(p)
    p.set_defaults(func=run)
