"""Pruning while training against one-shot pruning + fine-tune, at equal FLOPs and equal epochs.

From the trained ResNet-20 of each data set (``benchmarks/baselines/``), every row reaches the
same FLOPs target (default: keep 50%) and spends the same number of training epochs over the
training split: a one-shot row prunes and is fine-tuned for those epochs with the shared
schedule of ``benchmarks/methods.py``; a learned row *is* its training (its epochs equal the
fine-tune's), and is evaluated as it comes out::

    python benchmarks/learned_masks.py                       # tune the LR on validation, then every row
    python benchmarks/learned_masks.py --datasets cifar10-partial --rows pk:l2,dais --seeds 0
    python benchmarks/learned_masks.py --max-steps 2 --seeds 0 --results /tmp/lm.json   # smoke test
    nohup python benchmarks/learned_masks.py > runs/learned_masks.log 2>&1 &             # the full table

The protocol (splits, LR tuned on validation after plain L2 removal, calibration, FLOPs counted
for every row, seeds, 95% intervals, resumable results) is ``methods.py``'s, which this script
runs with its own rows and results file (``results/learned_masks.{json,md}``). Fine-tune /
training epochs: 2 over Fashion-MNIST (860 steps) and 10 over the CIFAR-10 images (370 steps),
so that methods that prune and then fine-tune inside their own run can split them.

Rows
----
One-shot, with the shared fine-tune: ``pk:l2`` (plain L2 removal), ``cap`` (closed-form
compensation), ``tp:group_sl`` (Torch-Pruning's DepGraph recipe: ``GroupNormPruner`` after
sparse training with ``regularize`` for as many steps as the fine-tune, so it trains twice as
long: see its compute columns), ``ucp`` (SE gates trained jointly for ``--ucp-steps`` steps).
Learned, their training being their recovery: ``slimming`` (L1 on BN scales for half the
epochs, prune, fine-tune the other half), ``scp`` and ``dais`` (soft masks / annealed
indicators for all epochs, no separate fine-tune; DAIS updates its indicators on the
validation split, the held-out part of the training data), ``autopruner`` (channel-selection
layers for half the epochs, layer by layer, then the other half of fine-tuning).

Sizing: 8 rows x 3 seeds x 2 data sets = 48 runs; about 12 minutes per Fashion-MNIST run and 5 per
CIFAR-10 run on this 2-core CPU with one thread, so about 7 hours in the background.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods as protocol  # noqa: E402  (benchmarks/methods.py: the protocol this suite runs)
from common import RESULTS_DIR  # noqa: E402

from prunekit import methods  # noqa: E402

Row = Callable[[protocol.Ctx], tuple[nn.Module, dict[str, Any]]]


def row_learned(name: str, split: bool = False, **options: Any) -> Row:
    """A training method run for the shared fine-tune's epochs: all of them (``split=False``) or
    the first half searching and the rest fine-tuning inside the method (``split=True``:
    its ``finetune_epochs``)."""
    def run(ctx: protocol.Ctx) -> tuple[nn.Module, dict[str, Any]]:
        epochs = ctx.args.ft_epochs[ctx.data.name]
        search = max(1, math.ceil(epochs / 2)) if split else epochs
        extra = {"finetune_epochs": epochs - search} if split else {}
        val = {"val_loader": ctx.data.val} if name == "dais" else {}
        res = methods.get(name)(ctx.base, ctx.data.x, loader=ctx.data.train_loader(ctx.seed), epochs=search,
                                train_config=protocol.finetune_config(ctx), target_flops=ctx.target,
                                ignore=[protocol.CLASSIFIER], **val, **extra, **options)
        info = {k: v for k, v in res.info.items() if isinstance(v, (int, float, str))}
        return res.model, {**info, "train_steps": ctx.ft_steps, "search_epochs": search,
                           "finetune_epochs": epochs - search}
    return run


ROWS: dict[str, Row] = {
    "pk:l2": protocol.ROWS["pk:l2"],
    "cap": protocol.ROWS["cap"],
    "tp:group_sl": protocol.ROWS["tp:group_sl"],
    "ucp": protocol.ROWS["ucp"],
    "slimming": row_learned("slimming", split=True),
    "scp": row_learned("scp"),
    "dais": row_learned("dais"),
    "autopruner": row_learned("autopruner", split=True),
}
LEARNED = frozenset({"slimming", "scp", "dais", "autopruner"})

SUITE = protocol.Suite(
    "Pruning while training vs one-shot + fine-tune, equal FLOPs and epochs: trained ResNet-20",
    ROWS, LEARNED, RESULTS_DIR / "learned_masks.json", {"fashion-mnist": 2, "cifar10-partial": 10},
    __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(protocol.main(suite=SUITE))
