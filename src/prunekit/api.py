"""The top-level API: :func:`trace`, :func:`plan_for` and :func:`prune`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from torch import nn

from prunekit._perf import engine_call
from prunekit.allocate import check_ratio, select
from prunekit.criteria import Criterion, score_groups
from prunekit.errors import PruningError
from prunekit.graph import DependencyGraph, module_names, trace
from prunekit.measure import count_flops, count_params
from prunekit.plan import PruningPlan
from prunekit.surgery import Journal, apply_plan, copy_module
from prunekit.planning import blame, channel_plan
from prunekit.surgery.validate import check

__all__ = ["trace", "plan_for", "prune"]
log = logging.getLogger(__name__)


@engine_call
def _plan_and_apply(model: nn.Module, example_inputs: Any, *, ratio: float, criterion: str | Criterion,
                    ignore: Iterable[nn.Module | str] | None, ratios: Mapping[str, float] | None,
                    global_ranking: bool, round_to: int, min_channels: int, inplace: bool,
                    graph: DependencyGraph | None, criterion_kwargs: Mapping[str, Any] | None,
                    max_repairs: int, target_flops: float | None = None, target_params: float | None = None,
                    target_latency: float | None = None, latency_table: Any = None) -> tuple[PruningPlan, nn.Module]:
    ratio = check_ratio(ratio, "ratio")
    budget = _budget(model, example_inputs, target_flops, target_params, target_latency, latency_table)
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
    for _ in range(max_repairs + 1):
        if budget is not None:
            removed = _removal_for_budget(model, graph, groups, scores, budget, options)
            ratio = float(sum(len(r) for r in removed) / max(1, graph.n_channels))
        else:
            removed = select(groups, scores, ratio=ratio, **options)
        meta = {
            "ratio": ratio, "criterion": criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom"),
            "global_ranking": global_ranking, "round_to": round_to, "groups": len(groups),
            "groups_pruned": int(sum(len(r) > 0 for r in removed)),
            "channels_removed": int(sum(len(r) for r in removed)), "channels": graph.n_channels, "repairs": repairs,
        }
        if budget is not None:
            meta[f"target_{budget.kind}"] = budget.target
        plan_, expected = channel_plan(model, graph, removed, meta)
        if plan_.is_empty:
            return plan_, model
        journal = Journal()
        candidate = apply_plan(model, plan_, inplace=inplace, journal=journal)
        mismatch = check(candidate, example_inputs, graph, expected)
        if mismatch is None:
            if budget is not None:  # what the budget measure says the result keeps (latency: estimated)
                plan_ = plan_.with_meta(**{f"{budget.kind}_kept": budget.measure(candidate) / budget.base})
            return plan_, candidate
        if inplace:
            journal.rollback()
        reason = (f"pruning it breaks op '{mismatch.op.name}' in module '{mismatch.op.module}' "
                  f"({mismatch.mode} mode: {mismatch.message})")
        blamed = blame(graph, groups, removed, mismatch)
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


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a target constrains: ``measure(model)`` of the pruned model over ``base`` must be
    at most ``target`` (a fraction kept)."""

    kind: str
    target: float
    base: float
    measure: Callable[[nn.Module], float]


def _budget(model: nn.Module, example_inputs: Any, target_flops: float | None, target_params: float | None,
            target_latency: float | None, latency_table: Any) -> Budget | None:
    given = {k: v for k, v in (("flops", target_flops), ("params", target_params), ("latency", target_latency))
             if v is not None}
    if not given:
        if latency_table is not None:
            raise PruningError("latency_table: only used with target_latency")
        return None
    if len(given) > 1:
        raise PruningError(f"give one budget, not {', '.join('target_' + k for k in given)}")
    kind, target = next(iter(given.items()))
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise PruningError(f"target_{kind}={target!r}: must be a number in (0, 1]") from None
    if not 0.0 < target <= 1.0:
        raise PruningError(f"target_{kind}={target!r}: must be in (0, 1] (the fraction of {kind} kept)")
    if kind == "flops":
        measure: Callable[[nn.Module], float] = lambda m: float(_flops(m, example_inputs))  # noqa: E731
    elif kind == "params":
        measure = lambda m: float(count_params(m))  # noqa: E731
    else:
        if latency_table is None:
            from prunekit.measure.latency_table import build_latency_table

            latency_table = build_latency_table(model, example_inputs)
        measure = latency_table.estimate
    return Budget(kind, target, measure(model), measure)


def _removal_for_budget(model: nn.Module, graph: DependencyGraph, groups: list[Any], scores: list[np.ndarray],
                      budget: Budget, options: dict[str, Any]) -> list[np.ndarray]:
    """Channels to remove so that the pruned model keeps at most ``budget.target`` of the
    budgeted quantity, as close to it as one channel allows.

    First bisect the ratio; a uniform ratio moves every group at once (ResNet-20's 16/32/64
    groups all step at multiples of 1/16), so then bisect over how many groups take the
    next step, in group order."""

    def value(removed: list[np.ndarray]) -> float:
        return budget.measure(apply_plan(model, channel_plan(model, graph, removed)[0])) / budget.base

    def fits(removed: list[np.ndarray]) -> bool:
        try:
            return value(removed) <= budget.target
        except Exception:  # noqa: BLE001 - a broken candidate is sorted out by validation
            return True

    lo, hi = 0.0, 0.99
    for _ in range(16):
        mid = (lo + hi) / 2
        if fits(select(groups, scores, ratio=mid, **options)):
            hi = mid
        else:
            lo = mid
    under, over = select(groups, scores, ratio=hi, **options), select(groups, scores, ratio=lo, **options)
    if not fits(under):
        return under  # even the largest ratio cannot meet the budget: prune as much as allowed
    steps = [i for i, (a, b) in enumerate(zip(under, over)) if len(a) != len(b) or not np.array_equal(a, b)]

    def mixed(k: int) -> list[np.ndarray]:
        take = set(steps[:k])
        return [under[i] if i in take else over[i] for i in range(len(groups))]

    a, b = 0, len(steps)  # mixed(b) fits
    while b - a > 1:
        k = (a + b) // 2
        if fits(mixed(k)):
            b = k
        else:
            a = k
    return mixed(b)


def plan_for(model: nn.Module, example_inputs: Any, *, ratio: float = 0.5, criterion: str | Criterion = "l2",
         ignore: Iterable[nn.Module | str] | None = None, ratios: Mapping[str, float] | None = None,
         global_ranking: bool = False, round_to: int = 1, min_channels: int = 1,
         graph: DependencyGraph | None = None, criterion_kwargs: Mapping[str, Any] | None = None,
         max_repairs: int = 32, target_flops: float | None = None, target_params: float | None = None,
         target_latency: float | None = None, latency_table: Any = None) -> PruningPlan:
    """Decide what to remove (and check that it works) without touching ``model``.

    Same options as :func:`prune`; returns the validated :class:`PruningPlan`, which
    :func:`prunekit.apply_plan` turns into a smaller model.
    """
    p, _ = _plan_and_apply(model, example_inputs, ratio=ratio, criterion=criterion, ignore=ignore, ratios=ratios,
                           global_ranking=global_ranking, round_to=round_to, min_channels=min_channels,
                           inplace=False, graph=graph, criterion_kwargs=criterion_kwargs, max_repairs=max_repairs,
                           target_flops=target_flops, target_params=target_params,
                           target_latency=target_latency, latency_table=latency_table)
    return p


def prune(model: nn.Module, example_inputs: Any, *, ratio: float = 0.5, criterion: str | Criterion = "l2",
          ignore: Iterable[nn.Module | str] | None = None, ratios: Mapping[str, float] | None = None,
          global_ranking: bool = False, round_to: int = 1, min_channels: int = 1, inplace: bool = False,
          graph: DependencyGraph | None = None, criterion_kwargs: Mapping[str, Any] | None = None,
          max_repairs: int = 32, target_flops: float | None = None, target_params: float | None = None,
          target_latency: float | None = None, latency_table: Any = None, return_plan: bool = False) -> Any:
    """Return a physically smaller copy of ``model`` (or prune it in place).

    ``ratio`` is the fraction of channels removed from every prunable group (ranked within
    the group by ``criterion``), unless ``global_ranking`` ranks normalised scores across
    groups. A budget replaces ``ratio``: ``target_flops``, ``target_params`` or
    ``target_latency`` (the fraction kept, e.g. 0.5) is met by bisecting the ratio; latency is
    estimated from a per-layer table measured on the model's device
    (:func:`prunekit.measure.latency_table.build_latency_table`; pass ``latency_table`` to
    reuse one). Data-driven criteria (``taylor``, ``activation``, ...) take
    ``criterion_kwargs={'loader': ..., 'batches': N}``. ``ratios`` maps module names to
    their own ratio; ``ignore`` lists modules whose output channels stay; ``round_to`` keeps
    channel counts multiples of it. The result is checked by running it: any op whose shape
    would break makes the groups involved stay, and the plan records why
    (``plan.meta['repairs']``). On any error the user's model is unchanged. With ``return_plan`` the result is ``(model, plan)``.

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18()
    >>> small = prune(m, torch.randn(1, 3, 64, 64), ratio=0.5, ignore=[m.fc])
    >>> small.layer1[0].conv1.out_channels
    32
    """
    p, pruned = _plan_and_apply(model, example_inputs, ratio=ratio, criterion=criterion, ignore=ignore, ratios=ratios,
                                global_ranking=global_ranking, round_to=round_to, min_channels=min_channels,
                                inplace=inplace, graph=graph, criterion_kwargs=criterion_kwargs, max_repairs=max_repairs,
                                target_flops=target_flops, target_params=target_params,
                                target_latency=target_latency, latency_table=latency_table)
    if pruned is model and not inplace:
        pruned = copy_module(model)
    return (pruned, p) if return_plan else pruned
