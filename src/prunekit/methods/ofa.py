"""OFARPruning (Sun, Cao, Xu et al., arXiv 2012.00996): once-for-all budgeted pruning across
pruning rates and input resolutions, a cohort of compact networks from one training run.

What the paper does (from its abstract, the only part available; PAPERS.md #14), and how this
module does it:

  1. **Structure search early in training.** Pruning masks are computed for several pruning
     rates x input resolutions; the search stops once the masks stop changing, measured by
     the cosine similarity of the masks between epochs (the "early-bird" winning tickets).
     Here, per member (a FLOPs budget ``rate`` at a resolution), the channels of every
     coupled group are ranked by ``criterion`` (``l2`` by default; ``l1``, ``bn`` = |BN
     gamma|, ...) and the ordinary budget allocator (:func:`prunekit.allocate.budget.removal_for_budget`,
     as :func:`prunekit.prune` uses it: bisection of a uniform ratio, then the groups taking
     the next channel, or a global ranking with ``global_ranking``) removes channels until
     the member's FLOPs, counted by the cost model of the network traced *at that
     resolution*, are at most its budget. The masks are recomputed at the end of every
     epoch; the search stops when :func:`early_bird_stop` holds: the last ``patience``
     similarities :func:`masks_similarity` (the lowest, over members, cosine similarity of
     a member's 0/1 keep mask over the prunable channels between consecutive epochs) are all
     at least ``similarity``.
  2. **Joint training.** Each step samples compact structures of different rates and
     resolutions sharing the weights and optimises them together. Here the masks are hard
     0/1 gates (:mod:`prunekit.gates.mask`) after each group's normalisation layers, so the
     gated network computes exactly what the member's pruned network computes; each step
     of :func:`prunekit.recover.train` runs the largest member on the batch (the loop's own
     forward), then, in a callback's extra loss, the smallest member and ``n_random``
     members drawn at random (the sandwich rule), each on the batch resampled to its
     resolution; their cross-entropy losses are summed into one backward pass.
  3. **Cohort.** One run gives networks for many FLOPs constraints and resolutions. Here
     :class:`~prunekit.methods.ofa_cohort.OFACohort` (``res.info["cohort"]``) holds the
     shared weights and the members; ``extract(flops=, resolution=)`` gives any member as a
     physically pruned model with its plan, ``members()`` lists FLOPs and parameters,
     ``save``/``load`` use safetensors + JSON, ``export`` writes every member (plan and ONNX).
     The method's own result is the member of ``target_flops`` at the example input's
     resolution.

Departures from the paper (its text beyond the abstract is not available, so every detail
below is ours):

  * The search runs on the given (usually trained) network with the fine-tune schedule, not
    from random initialisation early in a from-scratch run; its epochs count in ``epochs``
    and are capped at ``search_epochs`` (default ``epochs // 2``; 0: the masks of the given
    network, no search). A search that reaches the cap without stabilising keeps its last
    masks and says so (``info["search"]["converged"]``). During the search the unpruned
    network trains at the reference resolution. The threshold (0.95), the patience (2) and
    the minimum over members are our choices; early-bird (You et al.) uses a mask distance
    over a window of 5 epochs.
  * Rates are FLOPs budgets (fractions kept), by default of the unpruned network at the
    reference (largest) resolution (``budget_base="reference"``), so a lower resolution
    affords wider layers under the same budget; a member whose resolution alone meets its
    budget (the unpruned network at that resolution is within it) or that no allocation can
    meet is skipped and listed in ``info["skipped"]``. ``budget_base="own"`` measures each
    budget at the member's own resolution instead. ``target_flops`` is always a member.
  * Sandwich sampling (largest, smallest, random), as in slimmable networks, instead of
    purely random sampling; no in-place distillation; the largest member is the largest
    budget at the reference resolution (include ``1.0`` in ``rates`` to train the unpruned
    network too). Lower resolutions are bilinear resamplings of the loader's images, whose
    size is the reference.
  * BatchNorm: the members share every parameter, the BN affine ones included, and the
    running statistics are therefore a mixture of all members'; each extracted member gets
    its statistics re-estimated on ``bn_batches`` training batches resampled to its
    resolution (:func:`prunekit.recover.recalibrate_bn`, the BN calibration of
    US-Net), which the paper may or may not do.
  * Groups the gates cannot reach (no gate site) are kept whole, so that the gated network
    and the extracted one agree; they are listed in ``info["ungated_groups"]``. Groups whose
    removal a hard-coded size in the forward rejects are not repaired as :func:`prunekit.prune`
    repairs them: extraction raises PruningError naming the op.
  * Not tested under DistributedDataParallel (the extra members run on the unwrapped model).

>>> from prunekit.methods.ofa import early_bird_stop
>>> early_bird_stop([0.5, 0.97, 0.99], threshold=0.95, patience=2), early_bird_stop([0.97, 0.5], 0.95, 2)
(True, False)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunekit as pk
from prunekit.allocate.budget import Budget, removal_for_budget
from prunekit.allocate.cost import CostModel
from prunekit.criteria import score_groups
from prunekit.errors import PruningError
from prunekit.gates import GateSet, attach_gates
from prunekit.graph import module_names
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.methods._training import (ExpectedCost, budget_report, check_loader, split_options, training_config,
                                        working_copy)
from prunekit.methods.ofa_cohort import Member, OFACohort, Resolution, group_signature, resize
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig
from prunekit.recover.train import train

__all__ = ["OFACohort", "OFAOptions", "early_bird_stop", "mask_cosine", "masks_similarity", "ofa", "search_stop"]

# Criteria that read only the weights: the search re-scores every epoch on the gated model.
CRITERIA = ("l1", "l2", "bn", "l1_out", "l2_out", "fpgm")
Key = tuple[float, Resolution]  # (rate, resolution): one member


@dataclasses.dataclass(frozen=True)
class OFAOptions:
    """The method's knobs (each also a keyword of :func:`ofa`).

    ``rates``: FLOPs budgets of the members (fractions kept; ``target_flops`` is added);
    ``resolutions``: input sizes (ints for square inputs, or (H, W)); None: 1, 0.875 and 0.75
    of the example input's size (the reference, always included; none may exceed it);
    ``budget_base``: ``"reference"`` (a budget is a fraction of the unpruned network's FLOPs at
    the reference resolution) or ``"own"`` (at the member's resolution); ``criterion``: how
    channels are ranked (a weight criterion: l1, l2, bn, l1_out, l2_out, fpgm);
    ``similarity``/``patience``: the early-bird stop rule; ``search_epochs``: the most epochs
    of search (None: half the epochs); ``n_random``: random members per step besides the
    largest and the smallest; ``bn_batches``: training batches the returned member's BN
    statistics are re-estimated on (0: none); ``seed``: of the member sampling."""

    rates: tuple[float, ...] = (0.3, 0.5, 0.7)
    resolutions: tuple[Any, ...] | None = None
    budget_base: str = "reference"
    criterion: str = "l2"
    similarity: float = 0.95
    patience: int = 2
    search_epochs: int | None = None
    n_random: int = 2
    bn_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget_base not in ("reference", "own"):
            raise ValueError(f"ofa: budget_base={self.budget_base!r}; choose 'reference' or 'own'")
        if self.criterion not in CRITERIA:
            raise ValueError(f"ofa: criterion={self.criterion!r}; choose from {', '.join(CRITERIA)}")
        if not 0.0 < self.similarity <= 1.0 or self.patience < 1:
            raise ValueError(f"ofa: similarity={self.similarity} must be in (0, 1] and patience={self.patience} >= 1")
        if self.n_random < 0 or self.bn_batches < 0 or (self.search_epochs is not None and self.search_epochs < 0):
            raise ValueError("ofa: n_random, bn_batches and search_epochs must be >= 0")
        if any(not 0.0 < float(r) <= 1.0 for r in self.rates):
            raise ValueError(f"ofa: rates={self.rates}: FLOPs fractions kept, each in (0, 1]")


# ---------------------------------------------------------------------- the stop rule (pure)
def mask_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two 0/1 keep masks (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def masks_similarity(before: Mapping[Any, np.ndarray], after: Mapping[Any, np.ndarray]) -> float:
    """The lowest :func:`mask_cosine` over the members both mappings hold (member -> flat
    keep mask): the search is only as stable as its least stable member."""
    common = [k for k in before if k in after]
    if not common:
        raise ValueError("masks_similarity: no member in common")
    return min(mask_cosine(before[k], after[k]) for k in common)


def early_bird_stop(similarities: Sequence[float], threshold: float, patience: int) -> bool:
    """Whether the search stops: the last ``patience`` epoch-to-epoch similarities are all at
    least ``threshold``."""
    return len(similarities) >= patience and all(s >= threshold for s in similarities[-patience:])


def search_stop(masks: Sequence[Mapping[Any, np.ndarray]], threshold: float, patience: int) -> int | None:
    """The epoch at which the search stops for the per-epoch masks ``masks[0]`` (before
    training), ``masks[1]``, ...: the first ``t`` with :func:`early_bird_stop` true on the
    similarities of epochs 1..t; None if it never does. (The callback applies the same two
    functions epoch by epoch.)"""
    sims: list[float] = []
    for t in range(1, len(masks)):
        sims.append(masks_similarity(masks[t - 1], masks[t]))
        if early_bird_stop(sims, threshold, patience):
            return t
    return None


# ---------------------------------------------------------------------- member structures
class _Allocator:
    """Member structures from the current weights: scores by the criterion, then per member
    the ordinary budget allocator on the cost model at the member's resolution."""

    def __init__(self, groups: list[Any], costs: dict[Resolution, CostModel], bases: dict[Resolution, float],
                 keys: list[Key], options: dict[str, Any], criterion: str) -> None:
        self.groups, self.costs, self.bases, self.keys = groups, costs, bases, list(keys)
        self.options, self.criterion = options, criterion
        self.fallbacks: dict[str, str] = {}
        self._prunable = np.concatenate([g.prunable for g in groups]) if groups else np.zeros(0, dtype=bool)

    def removal(self, scores: list[np.ndarray], key: Key) -> list[np.ndarray]:
        """Channels removed per group for member ``key`` (PruningError if its budget cannot be met)."""
        rate, res = key
        cost, base = self.costs[res], self.bases[res]
        budget = Budget("flops", rate, base, measure=lambda m: float("nan"))  # the allocator reads kind and target
        return removal_for_budget(self.groups, scores, budget, self.options,
                                  lambda removed: float(cost.flops(cost.mask_of(removed))) / base)

    def structures(self, model: nn.Module) -> dict[Key, list[np.ndarray]]:
        """Every member's removal at ``model``'s current weights."""
        scores = score_groups(model, self.groups, self.criterion, fallbacks=self.fallbacks)
        return {k: self.removal(scores, k) for k in self.keys}

    def flat(self, removed: list[np.ndarray]) -> np.ndarray:
        """The member's 0/1 keep mask over the prunable channels of all groups (for the similarity)."""
        keep = [np.ones(g.size) for g in self.groups]
        for k, r in zip(keep, removed):
            k[np.asarray(r, dtype=np.int64)] = 0.0
        return np.concatenate(keep)[self._prunable] if keep else np.zeros(0)

    def fraction(self, removed: list[np.ndarray], res: Resolution) -> float:
        """FLOPs of the member at its resolution over its budget's base."""
        cost = self.costs[res]
        return float(cost.flops(cost.mask_of(removed))) / self.bases[res]


def _key_name(key: Key) -> str:
    return f"{key[0]:g}@{key[1][0]}x{key[1][1]}"


class _OFATraining(Callback):
    """The search, then the sandwich joint training, through the training loop's callbacks;
    its state (phase, masks, similarities, sampler) is checkpointed, so a killed run resumes
    exactly."""

    def __init__(self, allocator: _Allocator, gates: GateSet, reference: Resolution, opts: OFAOptions,
                 search_cap: int) -> None:
        self.allocator, self.gates, self.reference, self.opts = allocator, gates, reference, opts
        self.search_cap = search_cap
        self.keys = allocator.keys
        self.largest = max((k for k in self.keys if k[1] == reference), key=lambda k: k[0])
        self.removed: dict[Key, list[np.ndarray]] | None = None
        self.phase = "search" if search_cap > 0 else "joint"
        self.similarities: list[float] = []
        self.stop_epoch: int | None = None if search_cap > 0 else 0
        self.converged = False
        self.history: list[dict[str, Any]] = []
        self.generator = torch.Generator().manual_seed(opts.seed)
        self._masks: dict[Key, dict[str, Tensor]] = {}

    # -- structures and gates
    def _set(self, removed: dict[Key, list[np.ndarray]]) -> None:
        self.removed = removed
        self._masks = {}
        for key, rem in removed.items():
            per = {}
            for g, r in zip(self.allocator.groups, rem):
                if str(g.index) in self.gates.gates:
                    keep = torch.ones(g.size)
                    keep[torch.as_tensor(np.asarray(r, dtype=np.int64))] = 0.0
                    per[str(g.index)] = keep
            self._masks[key] = per
        fr = {k: self.allocator.fraction(r, k[1]) for k, r in removed.items()}
        self.smallest = min(self.keys, key=lambda k: fr[k] * self.allocator.bases[k[1]])

    def apply(self, key: Key | None) -> None:
        """Put member ``key``'s masks on the gates (None: all ones, the unpruned network)."""
        for name, gate in self.gates.gates.items():
            if key is None:
                gate.set_identity()  # type: ignore[operator]
            else:
                gate.set_mask(self._masks[key][name])  # type: ignore[operator]

    def _current(self) -> Key | None:
        return self.largest if self.phase == "joint" else None

    # -- the loop's hooks
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The structures of the given weights (epoch 0 of the search; on resume replaced by the saved ones)."""
        self._set(self.allocator.structures(model))
        self.apply(self._current())

    def on_batch_start(self, model: nn.Module, step: int) -> None:
        """The loop's forward is the largest member (the unpruned network while searching)."""
        self.apply(self._current())

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """Joint phase: the summed cross-entropy of the smallest and ``n_random`` random other
        members, each on the batch resampled to its resolution."""
        if self.phase != "joint" or len(self.keys) < 2:
            return None
        x, y = batch
        if tuple(x.shape[-2:]) != self.reference:
            raise PruningError(f"ofa: a training batch has size {tuple(x.shape[-2:])}, the example input "
                               f"{self.reference}: the loader must yield images at the reference resolution")
        rest = [k for k in self.keys if k not in (self.largest, self.smallest)]
        pick = torch.randperm(len(rest), generator=self.generator)[: self.opts.n_random].tolist() if rest else []
        chosen = ([self.smallest] if self.smallest != self.largest else []) + [rest[i] for i in pick]
        total = None
        for key in chosen:
            self.apply(key)
            loss = F.cross_entropy(model(resize(x, key[1])), y)
            total = loss if total is None else total + loss
        self.apply(self.largest)
        return total

    def on_step(self, model: nn.Module, step: int) -> None:
        """Back to the largest member, so that validation after the epoch measures it."""
        self.apply(self._current())

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        """Searching: recompute the structures, record their similarity to the previous
        epoch's and stop the search when :func:`early_bird_stop` holds or at the cap."""
        entry: dict[str, Any] = {"epoch": epoch, "phase": self.phase}
        if self.phase == "search":
            assert self.removed is not None
            new = self.allocator.structures(model)
            flat = self.allocator.flat
            sim = masks_similarity({k: flat(v) for k, v in self.removed.items()}, {k: flat(v) for k, v in new.items()})
            self.similarities.append(sim)
            self._set(new)
            record["mask_similarity"] = entry["similarity"] = sim
            self.converged = early_bird_stop(self.similarities, self.opts.similarity, self.opts.patience)
            if self.converged or epoch >= self.search_cap:
                self.phase, self.stop_epoch = "joint", epoch
        assert self.removed is not None
        entry["flops"] = {_key_name(k): self.allocator.fraction(r, k[1]) for k, r in self.removed.items()}
        self.history.append(entry)
        self.apply(self._current())

    def state_dict(self) -> dict[str, Any]:
        """Phase, structures, similarities, the stop, the sampler's state and the history."""
        assert self.removed is not None
        return {"phase": self.phase, "similarities": list(self.similarities), "stop_epoch": self.stop_epoch,
                "converged": self.converged, "history": copy.deepcopy(self.history),
                "generator": self.generator.get_state(),
                "removed": {_key_name(k): [np.asarray(r).tolist() for r in v] for k, v in self.removed.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.phase, self.similarities = state["phase"], list(state["similarities"])
        self.stop_epoch, self.converged = state["stop_epoch"], bool(state["converged"])
        self.history = list(state["history"])
        self.generator.set_state(state["generator"])
        saved = state["removed"]
        self._set({k: [np.asarray(r, dtype=np.int64) for r in saved[_key_name(k)]] for k in self.keys})
        self.apply(self._current())


# ---------------------------------------------------------------------- setting up
def _image_batch(example_inputs: Any) -> Tensor:
    if not isinstance(example_inputs, Tensor) or example_inputs.ndim != 4 or not example_inputs.is_floating_point():
        raise PruningError("method 'ofa': example_inputs must be one float image batch (N, C, H, W): the members "
                           "differ by input resolution")
    return example_inputs


def _resolutions(given: Sequence[Any] | None, ref: Resolution) -> list[Resolution]:
    """The member resolutions, the reference first, then decreasing; ValueError for one
    larger than the reference or not positive."""
    if given is None:
        given = [(max(1, round(ref[0] * f)), max(1, round(ref[1] * f))) for f in (0.875, 0.75)]
    out = [ref]
    for r in given:
        res = (int(r), int(r)) if isinstance(r, (int, np.integer)) else tuple(int(v) for v in r)
        if len(res) != 2 or min(res) < 1 or res[0] > ref[0] or res[1] > ref[1]:
            raise ValueError(f"ofa: resolution {r!r}: must be positive and at most the example input's {ref}")
        if res not in out:
            out.append(res)  # type: ignore[arg-type]
    return sorted(out, key=lambda s: (-s[0] * s[1], -s[0]))


def _same_groups(reference: Any, other: Any, res: Resolution) -> None:
    """PruningError unless ``other`` has the groups of ``reference`` (names, sizes, members)."""
    ok = group_signature(reference) == group_signature(other) and all(
        [(m.tensor, m.dim) for m in a.members] == [(m.tensor, m.dim) for m in b.members]
        and all(np.array_equal(ma.channel, mb.channel) for ma, mb in zip(a.members, b.members))
        and np.array_equal(a.prunable, b.prunable)
        for a, b in zip(reference.groups, other.groups))
    if not ok:
        raise PruningError(f"ofa: the model traced at {res[0]}x{res[1]} has other channel groups than at the "
                           "example input's size; give resolutions at which its structure is the same")


@register("ofa")
def ofa(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
        val_loader: Iterable[Any] | None = None, epochs: int | None = None, train_config: TrainConfig | None = None,
        run_dir: Any = None, resume: bool = False, batches: int | None = None, progress: bool = False,
        options: OFAOptions | None = None, **kwargs: Any) -> MethodResult:
    """OFARPruning: search member structures for every FLOPs budget of ``rates`` (plus
    ``target_flops``) at every one of ``resolutions`` on ``model``'s copy until they
    stabilise, train them jointly (sandwich sampling, shared weights) for the rest of
    ``epochs`` epochs of ``loader``, and return the member of ``target_flops`` at the example
    input's resolution, physically pruned, its BN statistics re-estimated on ``bn_batches``
    training batches.

    The training-method convention: ``val_loader`` is evaluated after every epoch (on the
    largest member), ``train_config`` defaults to the fine-tune schedule, ``batches`` caps
    the steps per epoch, ``run_dir``/``resume`` checkpoint every epoch and resume exactly.
    :class:`OFAOptions` fields are keywords too (``rates=``, ``resolutions=``, ...); the budget
    is ``target_flops`` (with ``ignore``, ``round_to``, ``min_channels``, ``global_ranking``).
    Returns a :class:`MethodResult` whose ``info`` holds ``cohort`` (the
    :class:`OFACohort`: every member extractable, savable, exportable), ``members``,
    ``skipped`` (budgets no member was made for, and why), ``search`` (similarities, stop
    epoch, convergence, per-epoch member FLOPs), ``ungated_groups``, ``budget`` and
    ``train``. Raises PruningError without ``loader`` or ``target_flops``, for unknown
    options or example inputs that are not an image batch; ValueError for bad options."""
    opts, rest = split_options(kwargs, OFAOptions, options, "ofa")
    cfg = budget_config(rest, "ofa")
    if cfg.target is None or cfg.target[0] != "flops":
        raise PruningError("method 'ofa': give target_flops= (the members are FLOPs budgets; the result is the "
                           "member of target_flops at the example input's resolution)")
    loader = check_loader(loader, "ofa")
    x = _image_batch(example_inputs)
    target = float(cfg.target[1])
    tcfg = training_config(train_config, epochs, batches)
    ignore = module_names(model, list(cfg.ignore), "ignore") if cfg.ignore else ()
    work = working_copy(model, x, cfg)
    ref: Resolution = (int(x.shape[-2]), int(x.shape[-1]))
    resolutions = _resolutions(opts.resolutions, ref)
    graphs, costs = {ref: work.graph}, {ref: work.cost}
    for res in resolutions[1:]:  # traced before the gates go on: FLOPs depend on the resolution
        xs = resize(x, res)
        graphs[res] = pk.trace(work.model.eval(), xs, ignore=ignore or None)
        _same_groups(work.graph, graphs[res], res)
        costs[res] = CostModel(graphs[res], work.model, xs)
    bases = {r: (work.cost.base_flops if opts.budget_base == "reference" else costs[r].base_flops) for r in resolutions}

    gates = attach_gates(work.model, work.graph, kind="mask")
    # A group without a gate site cannot be masked: kept whole, so gated == extracted.
    groups = [g if str(g.index) in gates.gates or g.n_prunable == 0
              else dataclasses.replace(g, prunable=np.zeros(g.size, dtype=bool)) for g in work.graph.groups]
    rates = sorted(set(float(r) for r in opts.rates) | {target})
    options = dict(ratios={}, global_ranking=cfg.global_ranking, round_to=cfg.round_to, min_channels=cfg.min_channels)
    allocator = _Allocator(groups, costs, bases, [], options, opts.criterion)
    keys, skipped = _members(allocator, work.model, rates, resolutions, ref, target)
    allocator.keys = keys
    cap = tcfg.epochs // 2 if opts.search_epochs is None else min(opts.search_epochs, tcfg.epochs)
    cb = _OFATraining(allocator, gates, ref, opts, cap)
    result = train(work.model, loader, tcfg, val_loader=val_loader, run_dir=run_dir, resume=resume,
                   progress=progress, callbacks=[cb])
    gates.detach()
    assert cb.removed is not None

    members = []
    for key in keys:
        rem = cb.removed[key]
        cost = costs[key[1]]
        mask = cost.mask_of(rem)
        members.append(Member(key[0], key[1], tuple(tuple(int(c) for c in r) for r in rem), float(cost.flops(mask)),
                              allocator.fraction(rem, key[1]), float(cost.params(mask))))
    meta = {"reference_flops": work.cost.base_flops, "budget_base": opts.budget_base, "criterion": opts.criterion,
            "rates": rates, "resolutions": [list(r) for r in resolutions]}
    cohort = OFACohort(work.model, tuple(x.shape), members, groups=group_signature(work.graph), ignore=ignore,
                       meta=meta, graphs=graphs)
    calib = take_batches(loader, opts.bn_batches, "ofa") if opts.bn_batches else None
    mine = cohort.extract(target, ref, calibration=calib)
    search = {"similarities": cb.similarities, "stop_epoch": cb.stop_epoch, "converged": cb.converged,
              "cap": cap, "threshold": opts.similarity, "patience": opts.patience, "history": cb.history}
    cohort.meta["search"] = search
    info = {"method": "ofa", "cohort": cohort, "members": cohort.members(), "skipped": skipped, "search": search,
            "ungated_groups": list(gates.ungated), "criterion_fallbacks": dict(allocator.fallbacks),
            "bn_recalibrated": mine.info["bn_recalibrated"],
            "budget": budget_report(work, ExpectedCost(work.cost, cfg), mine.plan, mine.model, x, None),
            "train": {"epochs": result.epochs_completed, "resumed_from_epoch": result.resumed_from_epoch,
                      "history": result.history}}
    return MethodResult(mine.model, mine.plan, info)


ofa.trains = True  # type: ignore[attr-defined]


def _members(allocator: _Allocator, model: nn.Module, rates: list[float], resolutions: list[Resolution],
             ref: Resolution, target: float) -> tuple[list[Key], list[dict[str, Any]]]:
    """The members (rate, resolution) that get a structure, and the skipped ones with the
    reason: the unpruned network at that resolution already within the budget, or a budget
    the allocator cannot meet. The target at the reference must exist (else PruningError)."""
    scores = score_groups(model, allocator.groups, allocator.criterion)
    keys, skipped = [], []
    for res in resolutions:
        full = allocator.costs[res].base_flops / allocator.bases[res]
        for rate in rates:
            key = (rate, res)
            why = None
            if full <= rate and rate < 1.0:
                why = f"the unpruned network at {res[0]}x{res[1]} keeps {full:.3f} of the FLOPs, within the budget"
            else:
                try:
                    allocator.removal(scores, key)
                except PruningError as exc:
                    if key == (target, ref):
                        raise
                    why = str(exc)
            if why is None:
                keys.append(key)
            elif key == (target, ref):
                raise PruningError(f"method 'ofa': target_flops={target:g}: {why}")
            else:
                skipped.append({"rate": rate, "resolution": list(res), "reason": why})
    return keys, skipped
