"""``prunekit`` command line: a thin shell over the Python API.

Every command prints one clear line and exits non-zero on bad input; runs write their
outputs into ``--out`` atomically, never deleting what is already there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _input_shape(text: str | None, model: Any, spec: str) -> tuple[int, ...]:
    if text:
        try:
            shape = tuple(int(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            raise CliError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,224,224") from None
        if len(shape) < 2 or any(v <= 0 for v in shape):
            raise CliError(f"--input-shape {text!r}: expected positive sizes, batch first")
        return shape
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return (1, *cfg["input_size"])
    if spec.startswith("torchvision:"):
        return (1, 3, 299, 299) if "inception" in spec else (1, 3, 224, 224)
    in_chans = getattr(model, "in_chans", 3)
    return (1, in_chans, 32, 32)


def _load_model(spec: str, num_classes: int | None, in_chans: int | None) -> Any:
    from prunekit.zoo import resolve_model

    try:
        return resolve_model(spec, num_classes=num_classes, in_chans=in_chans)
    except (KeyError, ValueError, FileNotFoundError, ImportError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise CliError(f"--model {spec}: {msg}") from None


def cmd_profile(args: argparse.Namespace) -> int:
    """Print params, FLOPs and measured latency of a model (or of a saved pruned model)."""
    import torch

    import prunekit as pk

    if args.model and Path(args.model).is_dir():
        model = pk.load(args.model)
        spec = pk.persist.load_plan(args.model).meta.get("model_spec", "")
    else:
        model = _load_model(args.model, args.num_classes, args.in_chans)
        spec = args.model
    model.eval()
    shape = _input_shape(args.input_shape, model, spec)
    prof = pk.profile(model, torch.randn(*shape), latency=not args.no_latency, threads=args.threads)
    print(json.dumps(prof.to_dict(), indent=1) if args.json else prof)
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    """Print the coupled channel groups of a model and why some channels cannot be pruned."""
    import torch

    import prunekit as pk

    model = _load_model(args.model, args.num_classes, args.in_chans).eval()
    shape = _input_shape(args.input_shape, model, args.model)
    graph = pk.trace(model, torch.randn(*shape))
    print(graph)
    return 0


def _common(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="model: a zoo name (resnet56), torchvision:NAME, timm:NAME or path/to/file.py:build_fn"
                   + ("" if model_required else ", or a directory written by `prunekit train` (default: the recipe's)"))
    p.add_argument("--num-classes", type=int, default=None, help="number of output classes (default: the model's)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels for zoo/timm models (default: 3)")
    p.add_argument("--input-shape", default=None,
                   help="example input shape, batch first, e.g. 1,3,224,224 (default: from the model)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for latency measurement (default: torch's)")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``prunekit`` command (one sub-command per job)."""
    parser = argparse.ArgumentParser(prog="prunekit", description="Structured pruning for PyTorch models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    # Recipe-backed options default to None: a --recipe fills them, flags given override it.
    p = sub.add_parser("prune", help="prune a model and write it with a before/after report")
    _common(p, model_required=False)
    p.add_argument("--recipe", default=None, help="YAML recipe file or packaged recipe name; flags override it")
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of channels removed from every group, 0 <= r < 1 (default 0.5)")
    p.add_argument("--criterion", default=None, help="importance criterion: l1, l2 (default), l1_out, bn, random, ...")
    p.add_argument("--ignore", nargs="*", default=None, help="module names whose output channels must stay")
    p.add_argument("--ratios", nargs="*", default=None, help="per-module ratios, e.g. layer4=0.7")
    p.add_argument("--global-ranking", action="store_true", default=None,
                   help="rank channels across groups (normalised scores)")
    p.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of this (default 1)")
    p.add_argument("--out", required=True, help="output directory (created; existing files are replaced atomically)")

    p = sub.add_parser("profile", help="params, FLOPs and measured latency of a model or a saved pruned model")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("graph", help="show the coupled channel groups of a model")
    _common(p)
    p.set_defaults(func=cmd_graph)

    from prunekit.cli import pipeline

    pipeline.add_commands(sub)
    from prunekit.cli import analyze
    analyze.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunekit`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"prunekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"prunekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
