"""Partition Pruning (Shahhosseini, Albaqsami, Jasemi, Bagherzadeh; arXiv 1901.11391, PDP 2020).

What the paper says (our sources are its two abstracts, not the full text): the large fully
connected layers are split into partitions, one per accelerator, and pruned "taking into
consideration parallelization", so the partitions run in parallel; on TinyVGG16 the pruned,
partitioned FC layers computed 7.72x faster with 2.73x less energy than the unpruned layers
on one accelerator, at a "limited" accuracy loss. The exact partitioning and pruning rule is
not in our sources. This module implements the reading below; every rule in it is ours.

  1. **Partition.** Every large ``nn.Linear`` (a ``LinearHandler`` layer with at least
     ``min_params`` weights, called once, not ignored, see step 3) has its output units split into ``P``
     contiguous partitions (``np.array_split`` of the unit indices), one per worker.
  2. **Cut the cross-partition connections.** Where a partitioned layer reads the output of
     another partitioned layer (the same channel group, that layer its only producer, so only
     per-unit ops such as ReLU, dropout or a batch norm lie between), the weights joining input
     partition ``q`` to output partition ``p != q`` are pruned: the pair becomes
     block-diagonal and no activation crosses between the workers there (``cross="drop"``,
     the default). The first partitioned layer of a chain reads its whole input (it is
     broadcast to every worker) and the layer after the chain gathers the concatenated
     partitions. ``cross="keep"`` keeps those weights (each block reads the whole input: a
     plain output split, the traffic an all-gather of the units that remain).
  3. **Prune units, balanced.** Every partition of a layer keeps the same number of units
     (balanced work per worker): ``ratio`` removes that fraction of each partition's units
     (of the smallest partition's size where ``P`` does not divide the width), the weakest by
     ``criterion`` (default ``l2``: the group norm of each unit's weights, read on the network
     whose cross-partition weights are already zeroed, so a unit is scored by the weights it
     keeps). A removed unit leaves its layer's output and its consumers' inputs (a channel
     slice through the dependency graph), which shrinks the traffic too. Only layers whose
     output units can be removed are partitioned (the hidden FC layers): the classifier,
     whose outputs are the classes, stays whole and gathers the last partitioned layer's
     output; so does a layer whose outputs are tied to others' (a residual add).
  4. **Run in parallel.** Each partitioned layer becomes a
     :class:`~prunekit.surgery.partitioned.PartitionedLinear` (``Replace`` step, factory
     ``partitioned_linear``): ``P`` ordinary linear blocks whose outputs are concatenated, run
     on ``P`` worker threads (``threads`` intra-op threads each) on the CPU, sequentially under
     tracing/export (ONNX). The plan is a channel slice then the replacements, relative to the
     original model, so ``prunekit.save`` / ``prunekit.load`` work without pickled code.

Budgets: ``target_params`` / ``target_flops`` set the units kept per partition (one fraction
of every layer's partition size, searched by bisection over the measured result) so that the
whole model lands at or below the target, within 2% where the unit steps allow
(``info["budget"]``); the partition count is given (``partitions``), not solved. Cutting the
cross-partition weights alone may already keep less than the target (a warning and
``within_tolerance`` False say so). ``target_latency`` is not supported.

Departures and simplifications (the paper's rule being unknown to us, all of the above is a
reading, labelled as such):

  * Units are assigned to partitions by contiguous index, not reordered to keep the strong
    weights inside the blocks (a balanced graph-partitioning problem).
  * Only fully connected layers are partitioned (as in the paper); convolutions are left
    alone, so a budget counts them as fixed cost.
  * Nothing is fine-tuned here: recover the accuracy with ``prunekit.recover.train`` (or
    ``prunekit finetune``) afterwards; the parallel path trains too (autograd across the
    worker threads).
  * Energy is not measured (no energy counter on our CPU machines); the speed-up is measured
    by ``benchmarks/partition.py`` with worker threads standing in for accelerators.
  * CUDA tensors run the blocks sequentially (kernels are asynchronous already; streams or
    one device per partition are not implemented).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

import prunekit as pk
from prunekit.allocate.budget import make_budget
from prunekit.allocate.units import budget_report, check_target_kind, smallest_prefix
from prunekit.config import PruneConfig
from prunekit.criteria import score_groups
from prunekit.errors import PruningError
from prunekit.graph import ChannelGroup, DependencyGraph, module_names, under
from prunekit.handlers import handler_for
from prunekit.handlers.linear import LinearHandler
from prunekit.measure import count_flops, count_params
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.plan import PruningPlan, Replace, compose
from prunekit.planning import channel_plan
from prunekit.surgery import apply_plan, copy_module

log = logging.getLogger(__name__)

__all__ = ["Layer", "PartitionOptions", "block_diagonal", "find_layers", "partition", "partition_ranges"]

CROSS = ("drop", "keep")


@dataclasses.dataclass(frozen=True)
class PartitionOptions:
    """Partition pruning's own knobs: ``partitions`` (P, one per worker), ``min_params`` (a
    linear layer is large enough to partition from this many weights), ``cross`` (``"drop"``
    the weights between partitions of consecutive partitioned layers, or ``"keep"`` them),
    ``criterion`` (unit importance, a registered criterion name), ``parallel`` and
    ``threads`` (how the result runs: worker threads, intra-op threads per worker). Checked
    on construction (ValueError naming the option)."""

    partitions: int = 2
    min_params: int = 1 << 16
    cross: str = "drop"
    criterion: str = "l2"
    parallel: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        for name, least in (("partitions", 1), ("min_params", 0), ("threads", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"partition: {name}={v!r} must be an integer >= {least}")
        if self.cross not in CROSS:
            raise ValueError(f"partition: cross={self.cross!r} must be one of {', '.join(CROSS)}")
        if not isinstance(self.criterion, str):
            raise ValueError(f"partition: criterion={self.criterion!r} must be a registered criterion name")


@dataclasses.dataclass(frozen=True)
class Layer:
    """A linear layer to partition: its qualified ``name``, widths, output ``parts`` (``[start,
    stop)`` unit ranges, one per partition), its output channel group (``group``, an index
    into ``graph.groups``) and the partitioned layer it reads block-diagonally (``reads``;
    None: it reads its whole input)."""

    name: str
    in_features: int
    out_features: int
    parts: tuple[tuple[int, int], ...]
    group: int
    reads: str | None = None


def partition_ranges(size: int, partitions: int) -> tuple[tuple[int, int], ...]:
    """``partitions`` contiguous ``[start, stop)`` ranges covering ``range(size)``, sizes
    differing by at most one (the first ones larger), as ``np.array_split`` cuts."""
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(size), partitions)])
    return tuple((int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]))


def _member_group(graph: DependencyGraph, tensor: str, dim: int) -> tuple[int, Any] | None:
    """(group index, member) of the group slicing ``tensor`` along ``dim``, or None."""
    for g in graph.groups:
        for m in g.members:
            if m.tensor == tensor and m.dim == dim:
                return g.index, m
    return None


def _identity(member: Any, size: int) -> bool:
    """Whether the member's indices are the group's channels one to one, in order."""
    return len(member.channel) == size and bool(np.array_equal(member.channel, np.arange(size)))


def _sole_producer(group: ChannelGroup, name: str) -> bool:
    """Whether every producing member of ``group`` is a tensor of module ``name``."""
    return all(m.tensor.startswith(name + ".") for m in group.members if m.role == "out")


def find_layers(model: nn.Module, graph: DependencyGraph, opts: PartitionOptions,
                ignore: tuple[str, ...] = ()) -> tuple[list[Layer], dict[str, str]]:
    """The linear layers of ``model`` to partition, in module order, and the reason each other
    linear layer is left alone (see steps 1-3 of the module docstring)."""
    calls = graph.state.calls["eval"]
    parents = {c.parent for c in calls}
    times = Counter(c.name for c in calls if c.index not in parents)
    P = opts.partitions
    found: list[Layer] = []
    skipped: dict[str, str] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if id(mod) in seen or not isinstance(handler_for(mod), LinearHandler):
            continue
        seen.add(id(mod))
        w = mod.weight
        out_f, in_f = int(w.shape[0]), int(w.shape[1])
        if under(name, ignore):
            skipped[name] = "ignored"
        elif w.numel() < opts.min_params:
            skipped[name] = f"{w.numel()} weights, below min_params={opts.min_params}"
        elif times[name] != 1:
            skipped[name] = f"called {times[name]} times in a forward pass (a partitioned layer must run once)"
        elif out_f < P:
            skipped[name] = f"{out_f} output units, fewer than {P} partitions"
        else:
            hit = _member_group(graph, f"{name}.weight", 0)
            group = graph.groups[hit[0]] if hit is not None else None
            if group is None or not bool(group.prunable.all()) or not _identity(hit[1], out_f):
                skipped[name] = "its output units cannot be removed (they reach the model output or are tied to it)"
            elif not _sole_producer(group, name):
                skipped[name] = "its output units are coupled to other layers' (e.g. by a residual add)"
            else:
                found.append(Layer(name, in_f, out_f, partition_ranges(out_f, P), group.index))
    if opts.cross == "drop" and P > 1:
        by_group = {layer.group: layer for layer in found}
        linked = []
        for layer in found:
            hit = _member_group(graph, f"{layer.name}.weight", 1)
            src = by_group.get(hit[0]) if hit is not None else None
            if (src is not None and src.name != layer.name and _identity(hit[1], layer.in_features)
                    and _sole_producer(graph.groups[hit[0]], src.name)):
                layer = dataclasses.replace(layer, reads=src.name)
            linked.append(layer)
        found = linked
    return found, skipped


def block_diagonal(model: nn.Module, layers: list[Layer]) -> nn.Module:
    """A copy of ``model`` whose partitioned layers that read another partitioned layer have
    their cross-partition weights set to zero (what the partitioned network computes before
    any unit is removed)."""
    by_name = {layer.name: layer for layer in layers}
    masked = copy_module(model)
    with torch.no_grad():
        for layer in layers:
            if layer.reads is None:
                continue
            w = masked.get_submodule(layer.name).weight
            keep = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
            for (o0, o1), (i0, i1) in zip(layer.parts, by_name[layer.reads].parts):
                keep[o0:o1, i0:i1] = True
            w.mul_(keep.to(w.dtype))
    return masked


def _kept_per_partition(layer: Layer, ratio: float, cfg: PruneConfig) -> int:
    """Units every partition of ``layer`` keeps at ``ratio``: of the smallest partition's
    size, rounded to ``round_to`` (down where rounding up would exceed it), at least
    ``min_channels / P`` and 1."""
    size = min(b - a for a, b in layer.parts)
    n = size - int(round(ratio * size))
    if cfg.round_to > 1:
        n = int(round(n / cfg.round_to)) * cfg.round_to
        n = n if n <= size else (size // cfg.round_to) * cfg.round_to
    least = max(1, math.ceil(cfg.min_channels / len(layer.parts)))
    return min(size, max(n, least))


def _kept_units(layer: Layer, score: np.ndarray, n: int) -> list[list[int]]:
    """The ``n`` highest-scored units of each partition (original indices, ascending; ties to
    the lower index)."""
    out = []
    for a, b in layer.parts:
        idx = np.arange(a, b)
        if n < b - a:
            order = np.argsort(-score[a:b], kind="stable")[:n]
            idx = np.sort(idx[order])
        out.append(idx.tolist())
    return out


def _build(model: nn.Module, graph: DependencyGraph, layers: list[Layer], kept: dict[str, list[list[int]]],
           opts: PartitionOptions) -> tuple[nn.Module, PruningPlan]:
    """The partitioned model (eval mode) and its plan for the kept units of every layer."""
    removed = [np.zeros(0, dtype=np.int64) for _ in graph.groups]
    for layer in layers:
        keep = np.concatenate([np.asarray(k, dtype=np.int64) for k in kept[layer.name]])
        removed[layer.group] = np.setdiff1d(np.arange(layer.out_features), keep)
    channels, _ = channel_plan(model, graph, removed)
    sliced = apply_plan(model, channels)
    sizes = {layer.name: [len(k) for k in kept[layer.name]] for layer in layers}
    steps = []
    for layer in layers:
        mod = sliced.get_submodule(layer.name)
        w, b = mod.weight.detach(), (mod.bias.detach() if mod.bias is not None else None)
        outs = sizes[layer.name]
        if layer.reads is not None:
            widths = sizes[layer.reads]
            starts = np.cumsum([0] + widths[:-1]).tolist()
            ranges = [[int(s), int(n)] for s, n in zip(starts, widths)]
        else:
            ranges = [[0, int(w.shape[1])]] * len(outs)
        args = {"in_features": int(w.shape[1]), "in_ranges": ranges, "out_sizes": outs, "bias": b is not None,
                "parallel": opts.parallel, "threads": opts.threads}
        state: dict[str, torch.Tensor] = {}
        row = 0
        for p, ((start, length), n) in enumerate(zip(ranges, outs)):
            state[f"blocks.{p}.weight"] = w[row:row + n, start:start + length].clone()
            if b is not None:
                state[f"blocks.{p}.bias"] = b[row:row + n].clone()
            row += n
        steps.append(Replace(layer.name, "partitioned_linear", args, state=state))
    structural = PruningPlan(tuple(steps))
    small = apply_plan(sliced, structural, inplace=True).eval()
    return small, compose(channels, structural)


def _traffic(layers: list[Layer], widths: dict[str, int]) -> dict[str, Any]:
    """Values received from other workers per input row, per partitioned layer: a block
    reading the whole input needs the ``(P - 1)`` other copies of it (broadcast or
    all-gather); a block-diagonal one needs none. ``before``: the same layers split by
    outputs alone, unpruned; ``after``: the result."""
    before, after = {}, {}
    for layer in layers:
        P = len(layer.parts)
        before[layer.name] = (P - 1) * layer.in_features
        after[layer.name] = 0 if layer.reads is not None else (P - 1) * widths[layer.name]
    return {"before": before, "after": after, "total_before": sum(before.values()), "total_after": sum(after.values())}


@register("partition")
def partition(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None, batches: int = 8,
              partitions: int = 2, min_params: int = 1 << 16, cross: str = "drop", criterion: str = "l2",
              parallel: bool = True, threads: int = 1, options: PartitionOptions | None = None,
              **kwargs: Any) -> MethodResult:
    """Split the large linear layers of ``model`` (a copy) into ``partitions`` balanced
    partitions, cut the weights between partitions of consecutive partitioned layers and prune
    each partition's weakest units, then replace each layer by a parallel
    :class:`~prunekit.surgery.partitioned.PartitionedLinear` (see the module docstring).

    The units removed per partition come from ``ratio`` (fraction of each partition; default
    0.5 as for every method) or from ``target_params`` / ``target_flops`` (the whole model at
    or below the target, within 2% where the unit steps allow); ``ignore`` leaves layers
    alone, ``round_to`` / ``min_channels`` bound the units kept per partition. ``options`` (a
    :class:`PartitionOptions`) replaces the keywords ``partitions`` ... ``threads``.
    ``loader``'s first ``batches`` batches reach a data-driven ``criterion``. The user's
    model is not changed. Returns the model (eval mode), its plan (a channel slice, then
    ``Replace`` steps) and ``info``: the partitioned layers (partition sizes, units kept per
    partition and which, the layer each reads block-diagonally), the skipped layers and why,
    the cross-partition traffic before and after, the ratio used, the budget reached and the
    FLOPs/params kept. Raises :class:`PruningError` for bad options, a latency target, no
    layer to partition or an unreachable target."""
    try:
        opts = options or PartitionOptions(partitions=partitions, min_params=min_params, cross=cross,
                                           criterion=criterion, parallel=parallel, threads=threads)
    except ValueError as exc:
        raise PruningError(str(exc)) from None
    cfg = budget_config(kwargs, "partition")
    check_target_kind(cfg.target, "partition")
    if cfg.ratios or cfg.group_ratios or cfg.global_ranking or cfg.allocation != "ratio":
        raise PruningError("partition: ratios, group_ratios, global_ranking and allocation are not supported (every "
                           "partition of every layer loses the same fraction of units)")
    ignore = module_names(model, list(cfg.ignore), "ignore") if cfg.ignore else ()
    graph = pk.trace(model, example_inputs)
    layers, skipped = find_layers(model, graph, opts, ignore)
    if not layers:
        raise PruningError(f"partition: no linear layer to partition ({skipped or 'the model has no linear layer'})")

    ctx: dict[str, Any] = {}
    if loader is not None:
        ctx = {"loader": take_batches(loader, batches, "partition"), "batches": batches}
    masked = block_diagonal(model, layers)
    try:
        scored = score_groups(masked, [graph.groups[layer.group] for layer in layers], opts.criterion, **ctx)
    except KeyError as exc:
        raise PruningError(f"partition: criterion {opts.criterion!r}: {exc.args[0]}") from None
    scores = {layer.name: s for layer, s in zip(layers, scored)}

    def kept_at(ratio: float) -> dict[str, list[list[int]]]:
        return {layer.name: _kept_units(layer, scores[layer.name], _kept_per_partition(layer, ratio, cfg))
                for layer in layers}

    info: dict[str, Any] = {"partitions": opts.partitions, "cross": opts.cross, "criterion": opts.criterion,
                            "skipped": skipped}
    if cfg.target is not None:
        budget = make_budget(model, example_inputs, cfg)
        assert budget is not None
        steps = max(min(b - a for a, b in layer.parts) for layer in layers)
        built: dict[int, tuple[nn.Module, PruningPlan]] = {}

        def at(s: int) -> tuple[nn.Module, PruningPlan]:
            if s not in built:
                built.clear()  # keep one model alive at a time (a VGG classifier is hundreds of MB)
                built[s] = _build(model, graph, layers, kept_at(s / steps), opts)
            return built[s]

        measured: dict[int, float] = {}

        def fits(s: int) -> bool:
            if s not in measured:
                measured[s] = budget.measure(at(s)[0]) / budget.base
            return measured[s] <= budget.target + 1e-12

        s = smallest_prefix(fits, steps)
        if s is None:
            raise PruningError(f"partition: {budget.kind} target {budget.target} is out of reach: pruning every "
                               f"partitioned layer to its fewest units keeps {measured[steps]:.4f} of the original "
                               f"(more partitions or a lower min_params partition more layers)")
        ratio = s / steps
        small, plan = at(s)
        info["budget"] = budget_report(budget.kind, budget.target, measured[s])
        if s == 0 and not info["budget"]["within_tolerance"]:
            log.warning("partition: cutting the cross-partition weights alone keeps %.4f of the %s, below the "
                        "target %.4f (fewer partitions or cross='keep' keep more)", measured[0], budget.kind,
                        budget.target)
    else:
        ratio = cfg.ratio
        small, plan = _build(model, graph, layers, kept_at(ratio), opts)
    kept = kept_at(ratio)
    sizes = {name: [len(k) for k in ks] for name, ks in kept.items()}
    widths = {layer.name: small.get_submodule(layer.name).in_features for layer in layers}
    base_flops, base_params = count_flops(model, example_inputs), count_params(model)
    info.update({
        "ratio": ratio,
        "layers": {layer.name: {"in_features": layer.in_features, "out_features": layer.out_features,
                                "partition_sizes": [b - a for a, b in layer.parts],
                                "kept_per_partition": sizes[layer.name][0], "kept": kept[layer.name],
                                "reads": layer.reads} for layer in layers},
        "traffic": _traffic(layers, widths),
        "flops_kept": count_flops(small, example_inputs) / base_flops,
        "params_kept": count_params(small) / base_params,
    })
    plan = plan.with_meta(method="partition", partitions=opts.partitions, cross=opts.cross,
                          partitioned=[layer.name for layer in layers])
    return MethodResult(small, plan, info)


partition.needs_data = False  # type: ignore[attr-defined]  # weight criteria need no data: the CLI's --data is optional
