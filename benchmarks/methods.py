"""One-shot pruning methods of prunekit against Torch-Pruning, at equal FLOPs, from trained baselines.

From the trained ResNet-20 of each data set (``benchmarks/train_baselines.py``; committed in
``benchmarks/baselines/``), every row prunes to the same FLOPs target (default: keep 50%),
is evaluated on the full test split *without* fine-tuning, then fine-tuned with one schedule
shared by every row and evaluated again::

    python benchmarks/methods.py                                   # tune the fine-tune LR, then every row
    python benchmarks/methods.py --datasets cifar10-partial --rows pk:l2,cap --seeds 0
    python benchmarks/methods.py --report-only                     # rebuild the Markdown
    nohup python benchmarks/methods.py > benchmarks/results/methods.log 2>&1 &   # the full table

Resumable: every finished (data set, row, seed) is kept in the results JSON and skipped on a
rerun. Seeds run outermost, so each row has one seed early and the intervals fill in later.

Protocol
--------
* Splits: the training files minus a class-balanced validation split (5,000 Fashion-MNIST /
  500 CIFAR-10 images, ``prunekit.zoo.data.VAL_SEED``, the ones the baselines never saw);
  the fine-tune LR and every searched option (``cap:search``) are chosen on validation, never
  on test; accuracy is on the full test splits (10,000 / 1,017).
* Calibration: ``--calib-batches`` batches of 64 unaugmented training images drawn per seed.
* Fine-tune (same for every row): SGD momentum 0.9, cosine from the tuned LR to 0, weight
  decay 5e-4, batch 128, augmentation on, over the full training split: ``--ft-epochs``
  (1 epoch of Fashion-MNIST = 430 steps; 10 epochs of CIFAR-10 = 370 steps by default).
* FLOPs: ``prunekit.measure.count_flops`` for every row, prunekit's and Torch-Pruning's; TP's
  ratio is bisected (14 steps) and the prune closest to the target kept; the achieved ratio is
  reported (TP's per-layer uniform ratio moves the FLOPs in steps of up to ~2%).
* Compute: wall seconds spent pruning (scoring, calibration passes, reconstruction, sparse
  training, searches) and fine-tuning, and training steps taken during pruning.

Rows
----
``pk:CRIT``: plain removal by a prunekit criterion. ``pk:l2+bn``: plus BN re-calibration on the
calibration batches (``prunekit.recover.recalibrate_bn``). ``pk:l2+lstsq``: plus least-squares
reconstruction of the layers after each pruned group (``prunekit.recover.reconstruct``).
``pk:l2+time``: plain removal fine-tuned for longer by the extra pruning time the slowest
reconstruction row of this data set spent (compute-matched). ``tp:IMP:local|global``:
Torch-Pruning's ``MagnitudePruner`` (L1 magnitude) / ``MetaPruner`` with ``TaylorImportance``,
per-layer uniform or global ranking. ``tp:group_sl``: TP's DepGraph recipe: ``GroupNormPruner``
(group L2 importance, global pruning) after sparse training with ``pruner.regularize`` (reg
5e-4) for the same number of steps as the fine-tune. ``tp:magnitude:local+lstsq``: TP's pruned
model with prunekit's reconstruction (reconstruction against reconstruction). Methods:
``channel_pruning`` (He et al. 2017), ``cap`` (closed-form compensation, greedy joint
selection), ``cap:search`` (CaP's per-group rate search with the step constraint, scored on
the validation split: lands where the search stops, not on the FLOPs target),
``cap:search:budget`` (the same search, its per-group ratios then scaled by one factor to the
FLOPs target: prunekit's addition, so the search is compared at equal FLOPs), ``ucp`` (SE
blocks trained jointly with the network for ``--ucp-steps`` steps, AdamW at the LR of
``UCP_LR_GRID`` with the best validation top-1 after ucp + the shared fine-tune, seed 0),
``ucp:scratch`` (the
pruned UCP structure re-initialised and retrained from scratch: its retraining *is* its
fine-tune, with the same number of steps), ``functionality`` (activation-clustering proxy).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit import methods  # noqa: E402
from prunekit.measure import count_flops, count_params  # noqa: E402
from prunekit.plan import PruningPlan, Slice  # noqa: E402
from prunekit.recover import TrainConfig, evaluate, recalibrate_bn, train  # noqa: E402
from prunekit.recover.reconstruct import reconstruct  # noqa: E402
from prunekit.zoo import load_dataset, make_loader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, machine_line, md_table, write_json  # noqa: E402

log = logging.getLogger("methods")
REPO = Path(__file__).resolve().parent.parent
DATASETS = ("fashion-mnist", "cifar10-partial")
VAL_SIZE = {"fashion-mnist": 5000, "cifar10-partial": 500}
FT_EPOCHS = {"fashion-mnist": 1, "cifar10-partial": 10}
LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.2)  # 0.1 is the baselines' own LR; 0.2 because 0.1 won on CIFAR
# UCP's joint SE training (AdamW) of a *trained* net: its default 1e-2 costs 11-17 pt of
# validation top-1 before any channel is removed (session 8), so smaller LRs are tuned; 3e-3
# and 3e-5 because the best of 1e-3..1e-4 sat at an edge on each data set.
UCP_LR_GRID = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5)
BATCH = 128
CLASSIFIER = "fc"


# --------------------------------------------------------------------------- data and context


@dataclass
class Data:
    """One data set's loaders and example input."""

    name: str
    x: torch.Tensor
    train: Any  # augmented training split (validation images excluded)
    val: Any
    test: Any
    calib_pool: Any  # unaugmented training images to draw calibration batches from

    def calib(self, batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``batches`` batches of 64 unaugmented training images drawn with ``seed``."""
        ds = self.calib_pool.dataset
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: 64 * batches]
        items = [ds[int(i)] for i in idx]
        return [(torch.stack([a for a, _ in items[i:i + 64]]), torch.tensor([b for _, b in items[i:i + 64]]))
                for i in range(0, len(items), 64)]

    def train_loader(self, seed: int) -> Any:
        """The fine-tuning loader (shuffled by ``seed``)."""
        return make_loader(self.train, batch_size=BATCH, shuffle=True, seed=seed)


def load_data(name: str, spec: str) -> Data:
    """Train (augmented, validation held out), validation, test and calibration pool of ``spec``."""
    v = VAL_SIZE[name]
    train_info = load_dataset(spec, split="train", val_size=v)
    pool = load_dataset(spec, split="train", val_size=v, augment=False)
    val_info = load_dataset(spec, split="val", val_size=v)
    test_info = load_dataset(spec, split="test")
    x = torch.zeros(1, train_info.in_chans, train_info.image_size, train_info.image_size)
    return Data(name, x, train_info, make_loader(val_info, batch_size=256, shuffle=False, seed=0),
                make_loader(test_info, batch_size=256, shuffle=False, seed=0), pool)


@dataclass
class Ctx:
    """What a row needs: the trained baseline, the data, calibration batches and options."""

    base: nn.Module
    data: Data
    calib: list[tuple[torch.Tensor, torch.Tensor]]
    seed: int
    args: argparse.Namespace
    ft_steps: int

    @property
    def target(self) -> float:
        return self.args.target_flops


# --------------------------------------------------------------------------- prunekit rows


def pk_prune(ctx: Ctx, criterion: str) -> tuple[nn.Module, PruningPlan]:
    """Plain removal by ``criterion`` to the FLOPs target (classifier kept)."""
    kw: dict[str, Any] = {"loader": ctx.calib, "batches": len(ctx.calib), "seed": ctx.seed}
    return pk.prune(ctx.base, ctx.data.x, criterion=criterion, criterion_kwargs=kw, target_flops=ctx.target,
                    ignore=[CLASSIFIER], return_plan=True)


def row_criterion(criterion: str) -> Callable[[Ctx], tuple[nn.Module, dict[str, Any]]]:
    def run(ctx: Ctx) -> tuple[nn.Module, dict[str, Any]]:
        return pk_prune(ctx, criterion)[0], {}
    return run


def row_l2_bn(ctx: Ctx) -> tuple[nn.Module, dict[str, Any]]:
    small, _ = pk_prune(ctx, "l2")
    return small, {"bn_recalibrated": recalibrate_bn(small, ctx.calib)}


def row_l2_lstsq(ctx: Ctx) -> tuple[nn.Module, dict[str, Any]]:
    small, plan = pk_prune(ctx, "l2")
    return small, {"reconstructed": len(reconstruct(small, ctx.base, plan, ctx.calib, seed=ctx.seed))}


def row_method(name: str, **options: Any) -> Callable[[Ctx], tuple[nn.Module, dict[str, Any]]]:
    def run(ctx: Ctx) -> tuple[nn.Module, dict[str, Any]]:
        res = methods.get(name)(ctx.base, ctx.data.x, loader=ctx.calib, batches=len(ctx.calib),
                                target_flops=ctx.target, ignore=[CLASSIFIER], seed=ctx.seed, **options)
        return res.model, {k: v for k, v in res.info.items() if isinstance(v, (int, float, str, dict))
                           and k not in ("trials",)}
    return run


def row_cap_search(ctx: Ctx, budget: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """CaP's rate search scored on the validation split; with ``budget`` its profile is scaled
    to the FLOPs target (``cap:search:budget``), else it lands where the search stops."""
    def val_acc(m: nn.Module) -> float:
        return float(evaluate(m.eval(), ctx.data.val, topk=(1,))["top1"])

    res = methods.get("cap")(ctx.base, ctx.data.x, loader=ctx.calib, batches=len(ctx.calib), ignore=[CLASSIFIER],
                             seed=ctx.seed, evaluate=val_acc, target_flops=ctx.target if budget else None)
    return res.model, {k: res.info[k] for k in ("searched_ratios", "scaled_ratios", "profile_scale")
                       if k in res.info} | {"trials": len(res.info.get("trials", []))}


def run_ucp(ctx: Ctx, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``ucp`` with the benchmark's SE training (``ucp_steps``, the tuned ``ucp_lr``) and
    ``options``; returns the pruned model and the row's info."""
    lr = ctx.args.ucp_lr[ctx.data.name]
    res = methods.get("ucp")(ctx.base, ctx.data.x, loader=ctx.data.train_loader(ctx.seed), batches=len(ctx.calib),
                             steps=ucp_steps(ctx), lr=lr, target_flops=ctx.target, ignore=[CLASSIFIER],
                             seed=ctx.seed, **options)
    return res.model, {"train_steps": ucp_steps(ctx), "ucp_lr": lr}


def row_ucp(ctx: Ctx) -> tuple[nn.Module, dict[str, Any]]:
    return run_ucp(ctx)


def ucp_steps(ctx: Ctx) -> int:
    """Joint SE-block training steps of the ucp rows."""
    return min(ctx.args.ucp_steps, ctx.args.max_steps or ctx.args.ucp_steps)


def row_ucp_scratch(ctx: Ctx) -> tuple[nn.Module, dict[str, Any]]:
    """UCP's structure retrained from scratch with the fine-tune's step count (its recovery)."""
    epochs = ctx.args.ft_epochs[ctx.data.name]
    cfg = TrainConfig(epochs=epochs, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step",
                      milestones=(max(1, epochs // 2), max(1, 3 * epochs // 4)) if epochs > 1 else (),
                      batch_size=BATCH, seed=ctx.seed, tensorboard=False, max_steps_per_epoch=ctx.args.max_steps)
    small, info = run_ucp(ctx, from_scratch=True, retrain_loader=ctx.data.train_loader(ctx.seed),
                          retrain_epochs=epochs, retrain_config=cfg)
    return small, {**info, "retrain_epochs": epochs}


# --------------------------------------------------------------------------- Torch-Pruning rows


def tp_make(kind: str, scope: str, model: nn.Module, x: torch.Tensor, ratio: float) -> Any:
    """A Torch-Pruning pruner as its documentation and reproduce scripts set it up."""
    import torch_pruning as tp

    common = {"pruning_ratio": ratio, "ignored_layers": [getattr(model, CLASSIFIER)], "global_pruning": scope == "global"}
    if kind == "magnitude":
        return tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), **common)
    if kind == "taylor":
        return tp.pruner.MetaPruner(model, x, importance=tp.importance.TaylorImportance(), **common)
    if kind == "group_sl":
        return tp.pruner.GroupNormPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=5e-4,
                                         **common)
    raise ValueError(kind)


def tp_bisect(ctx: Ctx, kind: str, scope: str, model: nn.Module) -> tuple[nn.Module, float]:
    """Prune a copy of ``model`` with TP, its ratio bisected to the FLOPs target; returns
    (the pruned model whose FLOPs are closest to the target, its ratio)."""
    x = ctx.data.x
    base = count_flops(ctx.base, x)
    grads = None
    if kind == "taylor":  # TP's Taylor importance reads .grad: the calibration gradient, computed once
        m = copy.deepcopy(model).eval()
        for xb, yb in ctx.calib:
            nn.functional.cross_entropy(m(xb), yb).backward()
        grads = [p.grad.clone() for p in m.parameters()]

    def run(ratio: float) -> nn.Module:
        m = copy.deepcopy(model).eval()
        pruner = tp_make(kind, scope, m, x, ratio)
        if grads is not None:
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        pruner.step()
        m.zero_grad(set_to_none=True)
        return m

    # Bisection, keeping the pruned model whose FLOPs are closest to the target on either side
    # (per-layer channel counts move in steps, so TP's local pruning cannot land exactly).
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = run(mid)
        kept = count_flops(m, x) / base
        if best is None or abs(kept - ctx.target) < best[2]:
            best = (m, mid, abs(kept - ctx.target))
        lo, hi = (mid, hi) if kept > ctx.target else (lo, mid)
    return best[0], best[1]


def row_tp(kind: str, scope: str) -> Callable[[Ctx], tuple[nn.Module, dict[str, Any]]]:
    def run(ctx: Ctx) -> tuple[nn.Module, dict[str, Any]]:
        small, ratio = tp_bisect(ctx, kind, scope, ctx.base)
        return small, {"tp_ratio": ratio}
    return run


def row_tp_group_sl(ctx: Ctx) -> tuple[nn.Module, dict[str, Any]]:
    """TP's sparse-learning recipe: train with ``pruner.regularize`` after each backward, then prune."""
    torch.manual_seed(ctx.seed)
    model = copy.deepcopy(ctx.base)
    pruner = tp_make("group_sl", "global", model, ctx.data.x, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=ctx.args.ft_lr[ctx.data.name], momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ctx.ft_steps)
    model.train()
    steps = 0
    while steps < ctx.ft_steps:
        for xb, yb in ctx.data.train_loader(ctx.seed + 1000 + steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            pruner.regularize(model)
            opt.step()
            sched.step()
            steps += 1
            if steps >= ctx.ft_steps:
                break
    del pruner
    small, ratio = tp_bisect(ctx, "group_sl", "global", model.eval())
    return small, {"tp_ratio": ratio, "train_steps": steps, "reg": 5e-4}


def tp_keep(base: nn.Module, small: nn.Module, x: torch.Tensor) -> PruningPlan:
    """The channel plan that turns ``base`` into Torch-Pruning's ``small``: each coupled group's
    kept channels are read off one of its BatchNorms (TP keeps the order and copies the
    statistics), every tensor's kept indices follow from its groups, and the plan is checked
    by slicing every tensor of ``base`` and comparing it with ``small``'s."""
    graph = pk.trace(base, x, ignore=[CLASSIFIER])
    sd_base, sd_small = base.state_dict(), small.state_dict()
    kept_pos: dict[tuple[str, int], np.ndarray] = {}
    for g in graph.groups:
        if g.n_prunable == 0:  # kept whole by both tools (e.g. the classifier's outputs)
            continue
        norm = next((m for m in g.members if m.role == "norm" and m.tensor.endswith(".weight")), None)
        if norm is None:
            raise RuntimeError(f"group {g.name}: no norm to read TP's kept channels from")
        prefix = norm.tensor[: -len("weight")]
        full, part = sd_base[prefix + "running_mean"], sd_small[prefix + "running_mean"]
        where = {float(v): i for i, v in enumerate(full.tolist())}
        kept_idx = [where[float(v)] for v in part.tolist()]
        kept_channels = set(int(c) for c in np.asarray(norm.channel)[kept_idx] if c >= 0)
        for m in g.members:
            key = (m.tensor, m.dim)
            mask = kept_pos.setdefault(key, np.ones(len(m.channel), dtype=bool))
            mask &= np.array([c < 0 or int(c) in kept_channels for c in m.channel])
    keep: dict[str, dict[int, list[int]]] = {}
    shapes: dict[str, list[int]] = {}
    for (tensor, dim), mask in kept_pos.items():
        if not mask.all():
            keep.setdefault(tensor, {})[dim] = np.flatnonzero(mask).tolist()
            shapes[tensor] = list(sd_base[tensor].shape)
    for name, t in sd_small.items():  # the oracle: base sliced by the plan is exactly TP's model
        ref = sd_base[name]
        for dim, idx in keep.get(name, {}).items():
            ref = ref.index_select(dim, torch.tensor(idx))
        if ref.shape != t.shape or not torch.equal(ref, t):
            raise RuntimeError(f"tp_keep: {name} of TP's model is not the base sliced by the derived plan")
    return PruningPlan((Slice(keep, shapes),))


def row_tp_lstsq(ctx: Ctx) -> tuple[nn.Module, dict[str, Any]]:
    small, ratio = tp_bisect(ctx, "magnitude", "local", ctx.base)
    plan = tp_keep(ctx.base, small, ctx.data.x)
    return small, {"tp_ratio": ratio, "reconstructed": len(reconstruct(small, ctx.base, plan, ctx.calib,
                                                                       seed=ctx.seed))}


ROWS: dict[str, Callable[[Ctx], tuple[nn.Module, dict[str, Any]]]] = {
    "pk:l2": row_criterion("l2"),
    "pk:l2+bn": row_l2_bn,
    "pk:l2+lstsq": row_l2_lstsq,
    "tp:magnitude:local": row_tp("magnitude", "local"),
    "tp:magnitude:global": row_tp("magnitude", "global"),
    "tp:taylor:local": row_tp("taylor", "local"),
    "tp:taylor:global": row_tp("taylor", "global"),
    "tp:group_sl": row_tp_group_sl,
    "tp:magnitude:local+lstsq": row_tp_lstsq,
    "channel_pruning": row_method("channel_pruning"),
    "cap": row_method("cap"),
    "cap:search": row_cap_search,
    "cap:search:budget": lambda ctx: row_cap_search(ctx, budget=True),
    "ucp": row_ucp,
    "ucp:scratch": row_ucp_scratch,
    "functionality": row_method("functionality"),
    "pk:random": row_criterion("random"),
    "pk:taylor": row_criterion("taylor"),
    "pk:l2+time": row_criterion("l2"),  # fine-tuned longer: see extra_steps()
}
NO_FINETUNE = frozenset({"ucp:scratch"})  # its retraining is its recovery
UCP_ROWS = frozenset({"ucp", "ucp:scratch"})  # their SE training LR is tuned: tune_ucp_lr()
RECONSTRUCTION_ROWS = ("pk:l2+lstsq", "channel_pruning", "cap", "tp:magnitude:local+lstsq")
TITLE = "One-shot pruning methods at equal FLOPs: trained ResNet-20, Fashion-MNIST and CIFAR-10 (partial)"


# --------------------------------------------------------------------------- one run


def finetune_config(ctx: Ctx, steps: int | None = None) -> TrainConfig:
    """The shared fine-tune schedule; ``steps`` (compute-matched row) stretches it."""
    epochs = ctx.args.ft_epochs[ctx.data.name]
    per_epoch = None
    if steps is not None and steps != ctx.ft_steps:
        epochs = max(epochs, math.ceil(steps / (ctx.ft_steps / epochs)))
        per_epoch = math.ceil(steps / epochs)
    for cap in (ctx.args.ft_steps_per_epoch.get(ctx.data.name), ctx.args.max_steps):
        if cap:
            per_epoch = min(per_epoch or cap, cap)
    return TrainConfig(epochs=epochs, lr=ctx.args.ft_lr[ctx.data.name], momentum=0.9, weight_decay=5e-4,
                       schedule="cosine", batch_size=BATCH, seed=ctx.seed, max_steps_per_epoch=per_epoch,
                       tensorboard=False)


def extra_steps(results: dict[str, Any], ds: str, ft_steps: int, ft_s: float) -> tuple[int, float]:
    """Fine-tune steps for ``pk:l2+time``: the shared schedule plus the extra pruning seconds the
    slowest reconstruction row spent over plain removal, converted at this data set's measured
    fine-tune speed. Returns (steps, extra seconds)."""
    def mean_prune(row: str) -> float | None:
        vals = [r["prune_s"] for r in results["runs"].values() if r["dataset"] == ds and r["row"] == row
                and r["status"] == "ok"]
        return statistics.mean(vals) if vals else None

    plain = mean_prune("pk:l2") or 0.0
    extra = max([(mean_prune(r) or 0.0) - plain for r in RECONSTRUCTION_ROWS] + [0.0])
    return ft_steps + int(round(extra / (ft_s / ft_steps))), extra


def steps_of(ds: str, data: Data, args: argparse.Namespace) -> int:
    """Optimizer steps of the shared fine-tune on ``ds``."""
    per_epoch = math.ceil(len(data.train) / BATCH)
    for cap in (args.ft_steps_per_epoch.get(ds), args.max_steps):
        per_epoch = min(per_epoch, cap) if cap else per_epoch
    return args.ft_epochs[ds] * per_epoch


Row = Callable[[Ctx], tuple[nn.Module, dict[str, Any]]]


def finished_stamp() -> str:
    """The UTC time now as a record's ``finished`` stamp (``merge_results`` keeps the later)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def l2_time_steps(ctx: Ctx, results: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``pk:l2+time``'s fine-tune steps (see :func:`extra_steps`) and what they matched."""
    ds = ctx.data.name
    plain = [r for r in results["runs"].values() if r["dataset"] == ds and r["row"] == "pk:l2" and r["status"] == "ok"]
    if not plain:
        raise RuntimeError("pk:l2+time needs a finished pk:l2 run of this data set first")
    steps, extra = extra_steps(results, ds, ctx.ft_steps, statistics.mean(r["finetune_s"] for r in plain))
    return steps, {"extra_prune_s_matched": extra}


#: A longer fine-tune for a row: (context, results) -> (steps, entries for the row's info).
StepsRule = Callable[[Ctx, dict[str, Any]], tuple[int, dict[str, Any]]]
LONGER_FINETUNE: dict[str, StepsRule] = {"pk:l2+time": l2_time_steps}


def run_one(ds: str, row: str, seed: int, base: nn.Module, data: Data, args: argparse.Namespace,
            results: dict[str, Any], rows: dict[str, Row] | None = None,
            measure: Callable[[nn.Module, Data], dict[str, Any]] | None = None,
            no_finetune: Collection[str] = NO_FINETUNE,
            longer: Mapping[str, StepsRule] | None = None) -> dict[str, Any]:
    """Prune, evaluate, fine-tune and evaluate one (data set, row, seed). ``rows`` (default
    :data:`ROWS`) maps row names to their pruning functions; ``measure(pruned model, data)``
    adds its entries (e.g. latency) to the record before the fine-tune; rows in
    ``no_finetune`` are final as they come out (their own training is their recovery); rows in
    ``longer`` (default :data:`LONGER_FINETUNE`) are fine-tuned for the steps their rule gives."""
    ctx = Ctx(base, data, data.calib(args.calib_batches, seed), seed, args, steps_of(ds, data, args))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    small, info = (ROWS if rows is None else rows)[row](ctx)
    prune_s = time.perf_counter() - t0
    small = small.eval()
    x = data.x
    rec: dict[str, Any] = {
        "dataset": ds, "row": row, "seed": seed, "status": "ok", "info": info, "prune_s": prune_s,
        "ft_lr": args.ft_lr[ds],
        "params": count_params(small), "flops": count_flops(small, x), "loadavg_1m": round(os.getloadavg()[0], 2),
        "top1_no_ft": evaluate(small, data.test, topk=(1,))["top1"],
    }
    if measure is not None:
        rec.update(measure(small, data))
    if row in no_finetune:
        rec.update(top1_ft=rec["top1_no_ft"], finetune_s=0.0, ft_steps=0)
        return rec
    steps = None
    rule = (LONGER_FINETUNE if longer is None else longer).get(row)
    if rule is not None:
        steps, matched = rule(ctx, results)
        rec["info"] = {**info, **matched}
    res = train(small, data.train_loader(seed), finetune_config(ctx, steps), progress=False)
    small.eval()
    rec.update(top1_ft=evaluate(small, data.test, topk=(1,))["top1"], val_top1_ft=evaluate(small, data.val,
               topk=(1,))["top1"], finetune_s=res.wall_time_s, ft_steps=res.global_step)
    return rec


def is_current(rec: dict[str, Any], ft_lr: dict[str, float], ucp_lr: dict[str, float]) -> bool:
    """Whether run record ``rec`` finished at the LRs tuned now: the fine-tune's ``ft_lr`` and,
    for the UCP rows, the SE training's ``ucp_lr`` (both per data set)."""
    ds = rec["dataset"]
    if rec.get("status") != "ok" or rec.get("ft_lr") != ft_lr.get(ds):
        return False
    if rec["row"] not in UCP_ROWS:
        return True
    return ucp_lr.get(ds) is not None and rec.get("info", {}).get("ucp_lr") == ucp_lr[ds]  # untuned runs: stale


def tune_on_val(ds: str, base: nn.Module, data: Data, args: argparse.Namespace, results: dict[str, Any], *,
                record: str, grid: tuple[float, ...], apply: Callable[[float], None],
                prune: Callable[[Ctx], nn.Module]) -> float:
    """The value of ``grid`` with the best *validation* top-1 after ``prune`` and the shared
    fine-tune (seed 0): each value is set with ``apply`` before its run and kept in
    ``results[record][ds]`` (a rerun skips the values there); the best is applied and returned."""
    tuning = results.setdefault(record, {}).setdefault(ds, {})
    for value in grid:
        if str(value) in tuning:
            continue
        apply(value)
        ctx = Ctx(base, data, data.calib(args.calib_batches, 0), 0, args, steps_of(ds, data, args))
        t0 = time.perf_counter()
        small = prune(ctx)
        train(small, data.train_loader(0), finetune_config(ctx), progress=False)
        tuning[str(value)] = {"val_top1": evaluate(small.eval(), data.val, topk=(1,))["top1"],
                              "seconds": time.perf_counter() - t0}
        log.info("%s: %s %g -> val top-1 %.4f", ds, record, value, tuning[str(value)]["val_top1"])
        write_json(Path(args.results), results)
    best = float(max((k for k in tuning if float(k) in grid), key=lambda k: tuning[k]["val_top1"]))
    apply(best)
    return best


def tune_lr(ds: str, base: nn.Module, data: Data, args: argparse.Namespace, results: dict[str, Any]) -> float:
    """The fine-tune LR of ``--lr-grid`` (default ``LR_GRID``) with the best *validation* accuracy
    after plain L2 removal (seed 0), kept in ``results['tuning']``."""
    return tune_on_val(ds, base, data, args, results, record="tuning", grid=lr_grid(args),
                       apply=lambda v: args.ft_lr.__setitem__(ds, v), prune=lambda ctx: pk_prune(ctx, "l2")[0])


def lr_grid(args: argparse.Namespace) -> tuple[float, ...]:
    """The fine-tune LRs ``--lr-grid`` asks to try (``LR_GRID`` when the option is absent)."""
    text = getattr(args, "lr_grid", None)
    return tuple(float(v) for v in text.split(",") if v) if text else LR_GRID


def tune_ucp_lr(ds: str, base: nn.Module, data: Data, args: argparse.Namespace, results: dict[str, Any]) -> float:
    """The LR of UCP's joint SE training of ``UCP_LR_GRID`` with the best *validation* accuracy
    after ``ucp`` and the shared fine-tune (seed 0), kept in ``results['tuning_ucp']``."""
    return tune_on_val(ds, base, data, args, results, record="tuning_ucp", grid=UCP_LR_GRID,
                       apply=lambda v: args.ucp_lr.__setitem__(ds, v), prune=lambda ctx: row_ucp(ctx)[0])


def lr_from(path: Path, ds: str) -> float | None:
    """The fine-tune LR this script (``methods.py``) tuned for ``ds`` (best validation top-1 of
    its complete grid in the results JSON at ``path``), or None when that grid is missing or incomplete."""
    if not path.exists():
        return None
    tuning = json.loads(path.read_text()).get("tuning", {}).get(ds, {})
    if not all(str(lr) in tuning for lr in LR_GRID):
        return None
    return float(max(tuning, key=lambda k: tuning[k]["val_top1"]))


def choose_lr(ds: str, base: nn.Module, data: Data, args: argparse.Namespace, results: dict[str, Any],
              fixed: float | None) -> tuple[float, str]:
    """The fine-tune LR for ``ds`` of a benchmark that shares this protocol (``rank_depth.py``,
    ``many_budgets.py``), and where it comes from: ``fixed`` (``--ft-lr``), else the LR this
    script tuned (results JSON ``args.lr_from``, its complete grid; an empty ``lr_from`` skips
    it), else tuned on validation by :func:`tune_lr` into ``results``. Returns (LR, source)."""
    if fixed is not None:
        return fixed, "--ft-lr"
    reused = lr_from(Path(args.lr_from), ds) if args.lr_from else None  # --lr-from '': tune here
    if reused is not None:
        return reused, f"tuned by methods.py, {Path(args.lr_from).name}"
    grid = ", ".join(f"{v:g}" for v in lr_grid(args))
    return tune_lr(ds, base, data, args, results), f"tuned here on validation over {grid}"


def begin(args: argparse.Namespace, table: dict[str, Any], config: dict[str, Any]
          ) -> tuple[Path, dict[str, Any], list[str], list[str], list[int]]:
    """The start of a benchmark sharing this protocol (``rank_depth.py``, ``many_budgets.py``):
    logging on, its results JSON (``args.results``), the data sets, rows of ``table`` and
    seeds asked for, the machine and ``results['config']`` = ``config`` plus the fine-tune LRs
    and their sources kept from the file. Returns (results path, results, data sets, rows, seeds)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results_path = Path(args.results)
    results = load_results(results_path)
    datasets, rows, seeds = selection(args, table)
    old = results.get("config", {})
    if args.report_only:  # a report describes the runs' machine and options, not this invocation's
        results.setdefault("machine", machine_info())
        results["config"] = {**config, "ft_lr": {}, "lr_source": {}, **old}  # options stored by merged shards win
        return results_path, results, datasets, rows, seeds
    results["machine"] = machine_info()
    results["config"] = {**config, "ft_lr": old.get("ft_lr", {}), "lr_source": old.get("lr_source", {})}
    return results_path, results, datasets, rows, seeds


def set_lrs(args: argparse.Namespace, loaded: dict[str, tuple[nn.Module, Data]], results: dict[str, Any]) -> None:
    """``args.ft_lr`` (``--ft-lr`` before) as a per-data-set dict from :func:`choose_lr`,
    recorded with its source in ``results['config']``."""
    fixed, args.ft_lr = args.ft_lr, {}
    for ds, (base, data) in loaded.items():
        args.ft_lr[ds], source = choose_lr(ds, base, data, args, results, fixed)
        results["config"]["ft_lr"][ds] = args.ft_lr[ds]
        results["config"]["lr_source"][ds] = source


# --------------------------------------------------------------------------- report


def interval(vals: list[float]) -> str:
    """Mean ± half-width of the 95% t-interval, in percent."""
    if not vals:
        return "-"
    m = statistics.mean(vals) * 100
    if len(vals) < 2:
        return f"{m:.2f}"
    from scipy import stats

    half = stats.t.ppf(0.975, len(vals) - 1) * statistics.stdev(vals) * 100 / math.sqrt(len(vals))
    return f"{m:.2f} ± {half:.2f}"


def grid_text(tuning: dict[str, Any]) -> str:
    """``"value: validation top-1%, ..."`` of a tuning record of :func:`tune_on_val`."""
    return ", ".join(f"{k}: {v['val_top1'] * 100:.2f}%" for k, v in tuning.items())


def ucp_tuning_line(results: dict[str, Any], ds: str) -> str:
    """The sentence on the UCP rows' tuned SE-training LR of ``ds`` (empty when not tuned)."""
    tuning = results.get("tuning_ucp", {}).get(ds, {})
    if not tuning:
        return ""
    return (f" UCP's joint SE training (AdamW, {results['config'].get('ucp_steps')} steps): LR "
            f"{results['config'].get('ucp_lr', {}).get(ds)} (validation top-1 after ucp + fine-tune: "
            f"{grid_text(tuning)}).")


def report(results: dict[str, Any], path: Path, table: dict[str, Row] | None = None, title: str = TITLE) -> None:
    """Write the Markdown tables of ``results``, a row per entry of ``table`` (default :data:`ROWS`)."""
    cfg = results["config"]
    lines = [f"# {title}", "",
             machine_line(results["machine"]), "",
             f"Target: keep {cfg['target_flops']:.0%} of the FLOPs (classifier kept). Calibration: "
             f"{cfg['calib_batches']} batches of 64 unaugmented training images per seed. Fine-tune, the same for "
             f"every row: SGD momentum 0.9, cosine from the LR tuned on validation to 0, weight decay 5e-4, batch "
             f"{BATCH}, augmentation, epochs over the training split: "
             + ", ".join(f"{v} on {k}" for k, v in cfg["ft_epochs"].items()) + ". Accuracy: full test splits; "
             "mean ± half-width of the 95% t-interval over the seeds. See the script's docstring for every row.", ""]
    for ds in DATASETS:
        base = results.get("baselines", {}).get(ds)
        if base is None:
            continue
        tuning = results.get("tuning", {}).get(ds, {})
        lines += [f"## {ds}", "",
                  f"Baseline: test top-1 {base['top1'] * 100:.2f}% ({base['test_images']} images), validation "
                  f"{base['val_top1'] * 100:.2f}%, {base['params'] / 1e3:.1f}K params, {base['flops'] / 1e6:.2f} "
                  f"MFLOPs. Fine-tune LR {cfg['ft_lr'].get(ds)} (validation top-1 after plain L2 removal: "
                  f"{grid_text(tuning)}"
                  + (f"; tuning runs copied from {results['tuning_copied_from'][ds]}"
                     if ds in results.get("tuning_copied_from", {}) else "")
                  + f"); {results.get('ft_steps', {}).get(ds, '?')} fine-tune steps."
                  + ucp_tuning_line(results, ds), ""]
        rows = []
        for row in (ROWS if table is None else table):
            runs = [r for r in results["runs"].values() if r["dataset"] == ds and r["row"] == row
                    and is_current(r, cfg["ft_lr"], cfg.get("ucp_lr", {}))]
            fails = [r for r in results["runs"].values() if r["dataset"] == ds and r["row"] == row and r["status"] != "ok"]
            if not runs:
                if fails:
                    rows.append([row, "FAIL: " + fails[0].get("error", "?")[:90]] + [""] * 8)
                continue
            fl = [r["flops"] / base["flops"] for r in runs]
            rows.append([row, interval([r["top1_no_ft"] for r in runs]), interval([r["top1_ft"] for r in runs]),
                         f"{statistics.mean(fl):.4f}" + (f" ({min(fl):.4f}-{max(fl):.4f})" if max(fl) > min(fl) else ""),
                         f"{statistics.mean(r['params'] for r in runs) / base['params']:.3f}",
                         f"{statistics.mean(r['prune_s'] for r in runs):.1f}",
                         str(int(statistics.mean(r.get("info", {}).get("train_steps", 0) for r in runs))),
                         f"{statistics.mean(r['finetune_s'] for r in runs):.0f}",
                         str(int(statistics.mean(r["ft_steps"] for r in runs))), len(runs)])
        lines += [md_table(["row", "top-1 % no fine-tune", "top-1 % fine-tuned", "FLOPs kept", "params kept",
                            "prune s", "prune train steps", "fine-tune s", "fine-tune steps", "seeds"], rows), ""]
    lines += ["Columns: *FLOPs kept* is the mean achieved ratio (range over seeds when they differ), counted by "
              "`prunekit.measure.count_flops` for every tool; *prune s* is the wall time of the pruning step (scoring, "
              "calibration passes, reconstruction, searches, TP's ratio bisection of 14 prunes, UCP's and "
              "`tp:group_sl`'s training); *prune train steps* counts optimizer steps taken while pruning; times are on "
              "a shared 2-core CPU and only comparable within one run.", ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------- main


def common_parser(description: str, rows: list[str], target_flops: float, results: Path) -> argparse.ArgumentParser:
    """The options of a benchmark over the trained baselines (``methods.py``, ``rank_depth.py``):
    data sets, ``rows`` (all by default), seeds, the FLOPs target, calibration, the shared
    fine-tune, threads, the smoke-test step cap, where baselines, data and results live."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--rows", default=",".join(rows), help=f"comma-separated subset of {', '.join(rows)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--target-flops", type=float, default=target_flops,
                   help=f"fraction of FLOPs kept (default {target_flops})")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 64 training images")
    p.add_argument("--ft-epochs", default=None, help="fine-tune epochs per data set, e.g. fashion-mnist=1,cifar10-partial=10")
    p.add_argument("--ft-steps-per-epoch", default=None,
                   help="cap on the fine-tune's steps per epoch per data set, e.g. fashion-mnist=80 (default: none)")
    p.add_argument("--ft-lr", type=float, default=None, help="fine-tune LR for every data set (default: tuned on validation)")
    p.add_argument("--lr-grid", default=",".join(map(str, LR_GRID)),
                   help="fine-tune LRs tried when the LR is tuned on validation (comma-separated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None, help="cap every training phase's steps (smoke tests only)")
    p.add_argument("--baselines", default=str(REPO / "benchmarks" / "baselines"))
    p.add_argument("--fashion-mnist", default=os.environ.get("PRUNEKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--cifar10-npz", default=os.environ.get("PRUNEKIT_CIFAR10_NPZ",
                                                           str(REPO.parent / "shared" / "data" / "cifar10-partial.npz")))
    p.add_argument("--results", default=str(results))
    p.add_argument("--report-only", action="store_true")
    return p


def selection(args: argparse.Namespace, table: dict[str, Any]) -> tuple[list[str], list[str], list[int]]:
    """The data sets, rows and seeds ``args`` asks for; SystemExit for a row not in ``table``."""
    datasets = [d for d in args.datasets.split(",") if d]
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in table]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(table)}")
    return datasets, rows, [int(s) for s in args.seeds.split(",") if s]


def per_dataset(text: str | None, defaults: dict[str, int] | None = None) -> dict[str, int]:
    """``"fashion-mnist=1,cifar10-partial=10"`` as a dict of ints over ``defaults``."""
    out = dict(defaults or {})
    for item in filter(None, (text or "").split(",")):
        k, _, v = item.partition("=")
        out[k] = int(v)
    return out


def finish_args(args: argparse.Namespace, ft_epochs: dict[str, int] = FT_EPOCHS) -> argparse.Namespace:
    """``args`` with ``ft_epochs`` parsed into a per-data-set dict over ``ft_epochs`` and
    ``ft_steps_per_epoch`` into a per-data-set dict (no cap where absent)."""
    args.ft_epochs = per_dataset(args.ft_epochs, ft_epochs)
    args.ft_steps_per_epoch = per_dataset(args.ft_steps_per_epoch)
    return args


@dataclass(frozen=True)
class Suite:
    """A table run by :func:`main`: its title, rows, the rows whose own training is their
    recovery (no shared fine-tune after them), default results file and fine-tune epochs.
    ``benchmarks/learned_masks.py`` is another suite."""

    title: str
    rows: dict[str, Row]
    no_finetune: frozenset[str]
    results: Path
    ft_epochs: dict[str, int]
    description: str


METHODS = Suite(TITLE, ROWS, NO_FINETUNE, RESULTS_DIR / "methods.json", FT_EPOCHS, __doc__.split("\n\n")[0])


def parse_args(argv: list[str] | None = None, suite: Suite = METHODS) -> argparse.Namespace:
    """Command-line options of ``suite``."""
    p = common_parser(suite.description, list(suite.rows), 0.5, suite.results)
    p.add_argument("--ucp-steps", type=int, default=200, help="joint SE-block training steps of the ucp rows")
    return finish_args(p.parse_args(argv), suite.ft_epochs)


def load_results(path: Path) -> dict[str, Any]:
    """The results JSON at ``path`` (empty when absent) with its ``runs`` and ``baselines``."""
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("runs", {})
    results.setdefault("baselines", {})
    for rec in results["runs"].values():  # runs recorded before "ft_lr" was: the LR of that time
        rec.setdefault("ft_lr", results.get("config", {}).get("ft_lr", {}).get(rec["dataset"]))
    return results


def load_all(args: argparse.Namespace, datasets: list[str], results: dict[str, Any]) -> dict[str, tuple[nn.Module, Data]]:
    """The trained baseline and the data of each of ``datasets`` (a missing one is skipped with
    a warning), their test/validation accuracy, size and fine-tune steps recorded in ``results``."""
    loaded: dict[str, tuple[nn.Module, Data]] = {}
    for ds in datasets:
        spec = f"fashion-mnist:{args.fashion_mnist}" if ds == "fashion-mnist" else f"cifar10:{args.cifar10_npz}"
        base_dir = Path(args.baselines) / ds
        try:
            data = load_data(ds, spec)
            base = pk.load(base_dir).eval()
        except (FileNotFoundError, ValueError) as exc:
            log.warning("%s: skipped (%s; run benchmarks/train_baselines.py)", ds, exc)
            continue
        loaded[ds] = (base, data)
        results["baselines"][ds] = {**results["baselines"].get(ds, {}),
                                    "top1": evaluate(base, data.test, topk=(1,))["top1"],
                                    "val_top1": evaluate(base, data.val, topk=(1,))["top1"],
                                    "test_images": len(data.test.dataset), "params": count_params(base),
                                    "flops": count_flops(base, data.x)}
        results.setdefault("ft_steps", {})[ds] = steps_of(ds, data, args)
    return loaded


def run_grid(args: argparse.Namespace, results: dict[str, Any], loaded: dict[str, tuple[nn.Module, Data]],
             rows: list[str], seeds: list[int], results_path: Path, write_report: Callable[[], None],
             table: dict[str, Row] | None = None,
             measure: Callable[[nn.Module, Data], dict[str, Any]] | None = None,
             no_finetune: Collection[str] = NO_FINETUNE, longer: Mapping[str, StepsRule] | None = None) -> None:
    """Run every (seed, data set, row) not yet finished at the current fine-tune LR, seeds
    outermost, saving the JSON and the report after each (:func:`run_one` does a row); a
    failing run is recorded as one."""
    for seed in seeds:
        for ds, (base, data) in loaded.items():
            for row in rows:
                key = f"{ds}/{row}/{seed}"
                done = results["runs"].get(key, {})
                if done and is_current(done, args.ft_lr, getattr(args, "ucp_lr", {})):
                    continue  # a run fine-tuned (or UCP-trained) at another LR than the tuned one is redone
                log.info("%s ...", key)
                try:
                    rec = run_one(ds, row, seed, base, data, args, results, table, measure, no_finetune, longer)
                except Exception as exc:  # noqa: BLE001 - a failing row is a result too
                    log.exception("%s failed", key)
                    rec = {"dataset": ds, "row": row, "seed": seed, "status": "fail",
                           "error": f"{type(exc).__name__}: {exc}"}
                rec["finished"] = finished_stamp()
                results["runs"][key] = rec
                log.info("%s: %s", key, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                                          if k in ("top1_no_ft", "top1_ft", "prune_s", "finetune_s", "status")})
                write_json(results_path, results)
                write_report()


def main(argv: list[str] | None = None, suite: Suite = METHODS) -> int:
    """Entry point: run ``suite``'s rows."""
    args = parse_args(argv, suite)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results_path = Path(args.results)
    results = load_results(results_path)
    datasets, rows, seeds = selection(args, suite.rows)
    if not (args.report_only and results.get("config")):  # a report keeps the runs' machine and options
        results["machine"] = machine_info()
        results["config"] = {"target_flops": args.target_flops, "calib_batches": args.calib_batches,
                             "ft_epochs": args.ft_epochs, "ucp_steps": args.ucp_steps, "threads": args.threads,
                             "ft_lr": results.get("config", {}).get("ft_lr", {}),
                             "ucp_lr": results.get("config", {}).get("ucp_lr", {})}
    md = results_path.with_suffix(".md")

    def write_report() -> None:
        report(results, md, suite.rows, suite.title)

    if args.report_only:
        write_report()
        return 0
    torch.set_num_threads(args.threads)
    loaded = load_all(args, datasets, results)
    fixed, args.ft_lr = args.ft_lr, {}
    for ds, (base, data) in loaded.items():
        # Re-derived from the tuning record every run, so a grid that grows re-tunes.
        args.ft_lr[ds] = fixed if fixed is not None else tune_lr(ds, base, data, args, results)
    results["config"]["ft_lr"] = dict(args.ft_lr)
    args.ucp_lr = {}
    if UCP_ROWS & set(rows):
        for ds, (base, data) in loaded.items():
            tune_ucp_lr(ds, base, data, args, results)
    results["config"]["ucp_lr"] = dict(args.ucp_lr)
    write_json(results_path, results)
    run_grid(args, results, loaded, rows, seeds, results_path, write_report, suite.rows, None, suite.no_finetune)
    write_report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
