"""The top-level API: :func:`trace`, :func:`plan_for` and :func:`prune`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Mapping

import numpy as np
from torch import nn

from prunekit.allocate import check_ratio, select
from prunekit.criteria import Criterion, score_groups
from prunekit.errors import PruningError
from prunekit.graph import DependencyGraph, module_names, trace
from prunekit.measure import count_flops
from prunekit.plan import PruningPlan
from prunekit.surgery import Journal, apply_plan
from prunekit.surgery.validate import attribute_fixes, check, expected_shapes, make_plan, removed_atoms

__all__ = ["trace", "plan_for", "prune"]
log = logging.getLogger(__name__)


def _plan_and_apply(model: nn.Module, example_inputs: Any, *, ratio: float, criterion: str | Criterion,
                    ignore: Iterable[nn.Module | str] | None, ratios: Mapping[str, float] | None,
                    global_ranking: bool, round_to: int, min_channels: int, inplace: bool,
                    graph: DependencyGraph | None, criterion_kwargs: Mapping[str, Any] | None,
                    max_repairs: int, target_flops: float | None = None) -> tuple[PruningPlan, nn.Module]:
    ratio = check_ratio(ratio, "ratio")
    if target_flops is not None and not 0.0 < float(target_flops) <= 1.0:
        raise PruningError(f"target_flops={target_flops!r}: must be in (0, 1] (the fraction of FLOPs kept)")
    checked: dict[str, float] = {}
    if ratios:
        names = module_names(model, list(ratios), "ratios")
        checked = {n: check_ratio(r, f"ratios['{n}']") for n, r in zip(names, ratios.values())}
    if graph is None:
        graph = trace(model, example_inputs, ignore=ignore)
    elif ignore:
        raise PruningError("ignore: pass it to trace() when you give a ready graph")
    scores = score_groups(model, graph.groups, criterion, **dict(criterion_kwargs or {}))
    groups = list(graph.groups)
    repairs: list[str] = []
    options = dict(ratios=checked, global_ranking=global_ranking, round_to=round_to, min_channels=min_channels)
    base_flops = _flops(model, example_inputs) if target_flops is not None else 0
    for _ in range(max_repairs + 1):
        if target_flops is not None:
            ratio = _ratio_for_flops(model, example_inputs, graph, groups, scores, float(target_flops), base_flops, options)
        removed = select(groups, scores, ratio=ratio, **options)
        gone = removed_atoms(graph, removed)
        base = make_plan(model, graph, gone)
        meta = {
            "ratio": ratio, "criterion": criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom"),
            "global_ranking": global_ranking, "round_to": round_to, "groups": len(groups),
            "groups_pruned": int(sum(len(r) > 0 for r in removed)),
            "channels_removed": int(sum(len(r) for r in removed)), "channels": graph.n_channels, "repairs": repairs,
        }
        if target_flops is not None:
            meta["target_flops"] = float(target_flops)
        if base.is_empty:
            return PruningPlan({}, {}, (), meta), model
        expected = expected_shapes(graph, gone)
        fixes = attribute_fixes(model, graph, expected)
        plan_ = PruningPlan(base.keep, base.shapes, tuple(fixes), meta)
        journal = Journal()
        candidate = apply_plan(model, plan_, inplace=inplace, journal=journal)
        mismatch = check(candidate, example_inputs, graph, expected)
        if mismatch is None:
            return plan_, candidate
        if inplace:
            journal.rollback()
        reason = (f"pruning it breaks op '{mismatch.op.name}' in module '{mismatch.op.module}' "
                  f"({mismatch.mode} mode: {mismatch.message})")
        blamed = _blame(graph, groups, removed, mismatch)
        if not blamed:
            raise PruningError(f"the pruned model fails and no group can be blamed: {reason}")
        for i in blamed:
            g = groups[i]
            groups[i] = dataclasses.replace(g, prunable=np.zeros(g.size, dtype=bool), reasons=(reason,) * g.size)
            repairs.append(f"{g.name}: {reason}")
            log.info("keeping group %s: %s", g.name, reason)
    raise PruningError(f"gave up after {max_repairs} repairs; last: {repairs[-1] if repairs else '?'}")


def _flops(model: nn.Module, example_inputs: Any) -> int:
    try:
        return count_flops(model, example_inputs, meta=True)
    except Exception:  # noqa: BLE001 - the meta device cannot run every model
        return count_flops(model, example_inputs)


def _ratio_for_flops(model: nn.Module, example_inputs: Any, graph: DependencyGraph, groups: list[Any],
                     scores: list[np.ndarray], target: float, base_flops: int, options: dict[str, Any]) -> float:
    """Bisect the ratio so the pruned model keeps ``target`` of the FLOPs (at or just below it)."""
    lo, hi = 0.0, 0.99
    best = 0.0
    for _ in range(14):
        mid = (lo + hi) / 2
        removed = select(groups, scores, ratio=mid, **options)
        gone = removed_atoms(graph, removed)
        base = make_plan(model, graph, gone)
        fixes = attribute_fixes(model, graph, expected_shapes(graph, gone))
        try:
            flops = _flops(apply_plan(model, PruningPlan(base.keep, base.shapes, tuple(fixes))), example_inputs)
        except Exception:  # noqa: BLE001 - a broken candidate is sorted out by validation
            return mid
        if flops / base_flops > target:
            lo = mid
        else:
            hi = best = mid
    return best if best else hi


def _touched_channels(graph: DependencyGraph, ops: list[Any]) -> set[int]:
    atoms: set[int] = set()
    for op in ops:
        for lab in list(op.in_labs) + list(op.out_labs):
            atoms.update(int(a) for a in lab.unique().tolist() if a != 0)
    comps = graph.comp[np.fromiter(atoms, dtype=np.int64)] if atoms else np.zeros(0, dtype=np.int64)
    return set(int(c) for c in comps if c >= 0)


def _blame(graph: DependencyGraph, groups: list[Any], removed: list[np.ndarray], mismatch: Any) -> list[int]:
    """Groups to keep whole after a validation failure, searched from narrow to wide: the
    failing op's own channels, then every op of its module, then of its parent module.
    (A size computed from an input's shape, e.g. ``C // num_heads``, is only visible there.)"""
    ops = graph.state.ops[mismatch.mode]
    module = mismatch.op.module
    parent = module.rpartition(".")[0]
    scopes = [[mismatch.op], [op for op in ops if op.module == module],
              [op for op in ops if op.module == parent or op.module.startswith(parent + ".")] if parent else ops]
    for scope in scopes:
        touched = _touched_channels(graph, scope)
        blamed = [i for i, (g, r) in enumerate(zip(groups, removed)) if len(r) and touched.intersection(g.channels[r].tolist())]
        if blamed:
            return blamed
    return []


def plan_for(model: nn.Module, example_inputs: Any, *, ratio: float = 0.5, criterion: str | Criterion = "l2",
         ignore: Iterable[nn.Module | str] | None = None, ratios: Mapping[str, float] | None = None,
         global_ranking: bool = False, round_to: int = 1, min_channels: int = 1,
         graph: DependencyGraph | None = None, criterion_kwargs: Mapping[str, Any] | None = None,
         max_repairs: int = 8, target_flops: float | None = None) -> PruningPlan:
    """Decide what to remove (and check that it works) without touching ``model``.

    Same options as :func:`prune`; returns the validated :class:`PruningPlan`, which
    :func:`prunekit.apply_plan` turns into a smaller model.
    """
    p, _ = _plan_and_apply(model, example_inputs, ratio=ratio, criterion=criterion, ignore=ignore, ratios=ratios,
                           global_ranking=global_ranking, round_to=round_to, min_channels=min_channels,
                           inplace=False, graph=graph, criterion_kwargs=criterion_kwargs, max_repairs=max_repairs,
                           target_flops=target_flops)
    return p


def prune(model: nn.Module, example_inputs: Any, *, ratio: float = 0.5, criterion: str | Criterion = "l2",
          ignore: Iterable[nn.Module | str] | None = None, ratios: Mapping[str, float] | None = None,
          global_ranking: bool = False, round_to: int = 1, min_channels: int = 1, inplace: bool = False,
          graph: DependencyGraph | None = None, criterion_kwargs: Mapping[str, Any] | None = None,
          max_repairs: int = 8, target_flops: float | None = None, return_plan: bool = False) -> Any:
    """Return a physically smaller copy of ``model`` (or prune it in place).

    ``ratio`` is the fraction of channels removed from every prunable group (ranked within
    the group by ``criterion``), unless ``global_ranking`` ranks normalised scores across
    groups; with ``target_flops`` (fraction of FLOPs to keep, e.g. 0.5) the ratio is found
    by bisection instead. ``ratios`` maps module names to their own ratio; ``ignore`` lists modules whose
    output channels stay; ``round_to`` keeps channel counts multiples of it. The result is
    checked by running it: any op whose shape would break makes the groups involved stay,
    and the plan records why (``plan.meta['repairs']``). On any error the user's model is
    unchanged. With ``return_plan`` the result is ``(model, plan)``.

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18()
    >>> small = prune(m, torch.randn(1, 3, 64, 64), ratio=0.5, ignore=[m.fc])
    >>> small.layer1[0].conv1.out_channels
    32
    """
    p, pruned = _plan_and_apply(model, example_inputs, ratio=ratio, criterion=criterion, ignore=ignore, ratios=ratios,
                                global_ranking=global_ranking, round_to=round_to, min_channels=min_channels,
                                inplace=inplace, graph=graph, criterion_kwargs=criterion_kwargs, max_repairs=max_repairs,
                                target_flops=target_flops)
    if pruned is model and not inplace:
        import copy

        pruned = copy.deepcopy(model)
    return (pruned, p) if return_plan else pruned
