"""The top-level API: :func:`trace`, :func:`plan_for` and :func:`prune`."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit._perf import engine_call
from prunekit.allocate import resolve_group_ratios, select
from prunekit.allocate.budget import Budget, make_budget, removal_for_budget
from prunekit.allocate.cost import CostModel
from prunekit.allocate.knapsack import knapsack_removal
from prunekit.config import PruneConfig, criterion_name, make_config
from prunekit.criteria import score_groups
from prunekit.errors import PruningError, PruningShortfallWarning
from prunekit.graph import DependencyGraph, module_names, trace
from prunekit.graph.dependency import unprunable_cost
from prunekit.plan import PruningPlan
from prunekit.runtime import call_model, model_mode
from prunekit.planning import blame, changed_quotients, channel_plan, quotient_groups
from prunekit.surgery import Journal, apply_plan, copy_module
from prunekit.surgery.validate import check

__all__ = ["trace", "plan_for", "prune"]
log = logging.getLogger(__name__)


@engine_call
def _plan_and_apply(model: nn.Module, example_inputs: Any, cfg: PruneConfig, *, inplace: bool,
                    graph: DependencyGraph | None) -> tuple[PruningPlan, nn.Module]:
    ratios: dict[str, float] = {}
    if cfg.ratios:  # the config checked the values; resolving the names needs the model
        ratios = dict(zip(module_names(model, list(cfg.ratios), "ratios"), cfg.ratios.values()))
    if graph is not None and cfg.ignore:
        raise PruningError("ignore: pass it to trace() when you give a ready graph")
    try:
        budget = make_budget(model, example_inputs, cfg)
        if graph is None:
            graph = trace(model, example_inputs, ignore=cfg.ignore)
    except PruningError:
        raise
    except Exception:
        _check_inputs(model, example_inputs)
        raise
    ratio = cfg.ratio
    fallbacks: dict[str, str] = {}  # group name -> how its criterion fell back (plan.meta["criterion_fallbacks"])
    scores = score_groups(model, graph.groups, cfg.criterion, fallbacks=fallbacks, **dict(cfg.criterion_kwargs or {}))
    measure = _BudgetMeasure.build(model, graph, budget) if budget is not None else None
    groups = list(graph.groups)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    prunable0 = sum(g.n_prunable for g in groups)  # before repairs: what the ratio asks of
    repairs: list[str] = []
    options = dict(ratios=ratios, global_ranking=cfg.global_ranking, min_channels=cfg.min_channels,
                   group_ratios=resolve_group_ratios(groups, cfg.group_ratios), ties=graph.ties)

    def allocate(round_to: int) -> list[np.ndarray]:
        """The channels to remove from each of ``groups`` (as repairs leave them) at ``round_to``."""
        if budget is not None and cfg.allocation == "knapsack":
            if measure.cost is None:
                raise PruningError("allocation='knapsack' needs the cost model, which does not describe this model "
                                   "(see the log); use allocation='ratio'")
            return knapsack_removal(groups, scores, measure.cost, budget.kind, budget.target,
                                    raw=cfg.global_ranking == "raw", round_to=round_to, min_channels=cfg.min_channels,
                                    ties=graph.ties)
        if budget is not None:
            return removal_for_budget(groups, scores, budget, {**options, "round_to": round_to}, measure.value)
        return select(groups, scores, ratio=cfg.ratio, round_to=round_to, **options)

    round_to, auto = (_auto_round_to(model, example_inputs, graph, cfg, budget, measure, allocate)
                      if cfg.round_to == "auto" else (cfg.round_to, None))
    for _ in range(cfg.max_repairs + 1):
        removed = allocate(round_to)
        if budget is not None:
            ratio = float(sum(len(r) for r in removed) / max(1, graph.n_channels))
        # With per-group ratios the uniform ratio says little: report the fraction removed.
        shown = float(sum(len(r) for r in removed) / max(1, graph.n_channels)) if cfg.group_ratios else ratio
        meta = {
            "ratio": shown, "criterion": criterion_name(cfg.criterion),
            "global_ranking": cfg.global_ranking, "allocation": cfg.allocation, "round_to": round_to,
            "groups": len(groups),
            "groups_pruned": int(sum(len(r) > 0 for r in removed)),
            "channels_removed": int(sum(len(r) for r in removed)), "channels": graph.n_channels, "repairs": repairs,
        }
        if auto is not None:
            meta["round_to_auto"] = auto
        if budget is not None:
            meta[f"target_{budget.kind}"] = budget.target
        if fallbacks:
            meta["criterion_fallbacks"] = dict(fallbacks)
        if graph.ties:  # groups kept at one fraction (graph.ties), with the fraction each kept
            meta["ties"] = [{"groups": [groups[i].name for i in tie],
                             "kept": round(1 - len(removed[tie[0]]) / max(1, groups[tie[0]].size), 4)}
                            for tie in graph.ties]
        plan_, expected = channel_plan(model, graph, removed, meta)
        if plan_.is_empty:
            return _with_shortfall(_with_unprunable(plan_, groups, shapes), cfg, budget, graph, prunable0), model
        broken = changed_quotients(graph, removed, plan_.attrs)
        if broken:  # a value such as (C // num_heads) ** -0.5 would change: keep what it counts
            for atoms, reason in broken:
                _keep_whole(groups, quotient_groups(graph, groups, removed, atoms), reason, repairs)
            continue
        journal = Journal()
        candidate = apply_plan(model, plan_, inplace=inplace, journal=journal)
        try:
            mismatch = check(candidate, example_inputs, graph, expected)
            if mismatch is None and measure is not None:  # what the budget measure says the result keeps
                plan_ = plan_.with_meta(**{f"{budget.kind}_kept": measure.kept(plan_, candidate)})
        except BaseException:  # an interrupt or a failure after the surgery must not leave a half-pruned model
            if inplace:
                journal.rollback()
            raise
        if mismatch is None:
            return _with_shortfall(_with_unprunable(plan_, groups, shapes), cfg, budget, graph, prunable0), candidate
        if inplace:
            journal.rollback()
        reason = (f"pruning it breaks op '{mismatch.op.name}' in module '{mismatch.op.module}' "
                  f"({mismatch.mode} mode: {mismatch.message})")
        _keep_whole(groups, blame(graph, groups, removed, mismatch), reason, repairs)
    raise PruningError(f"gave up after {cfg.max_repairs} repairs; last: {repairs[-1] if repairs else '?'}")


def _keep_whole(groups: list[Any], indices: list[int], reason: str, repairs: list[str]) -> None:
    """Make ``groups[i]`` (for ``i`` in ``indices``) unprunable for ``reason``, in place, and
    record the repair; raise when there is no group to keep (the failure has no cause here)."""
    if not indices:
        raise PruningError(f"the pruned model fails and no group can be blamed: {reason}")
    for i in indices:
        g = groups[i]
        groups[i] = dataclasses.replace(g, prunable=np.zeros(g.size, dtype=bool), reasons=(reason,) * g.size)
        repairs.append(f"{g.name}: {reason}")
        log.info("keeping group %s: %s", g.name, reason)


def _with_unprunable(plan: PruningPlan, groups: list[Any], shapes: dict[str, tuple[int, ...]]) -> PruningPlan:
    """``plan`` with ``meta["unprunable"]``: what the channels of ``groups`` (as the repairs
    left them) that must stay hold, and why (the CLI prints the largest); unchanged when
    every channel is prunable."""
    held = unprunable_cost(groups, shapes)
    return plan.with_meta(unprunable=held) if held["reasons"] else plan


def _auto_round_to(model: nn.Module, example_inputs: Any, graph: DependencyGraph, cfg: PruneConfig,
                   budget: Budget | None, measure: _BudgetMeasure | None,
                   allocate: Any) -> tuple[int, dict[str, Any]]:
    """``round_to="auto"``: the multiple :func:`prunekit.allocate.rounding.choose_round_to`
    picks from the width table (``cfg.width_table``, or timed on ``cfg.round_backend``), and
    its record for ``plan.meta["round_to_auto"]``."""
    from prunekit.allocate.rounding import choose_round_to
    from prunekit.measure.width_table import build_width_table

    given = cfg.width_table
    if given is None or (callable(given) and not hasattr(given, "estimate")):
        table = build_width_table(model, example_inputs, backend=cfg.round_backend, timer=given)
    else:
        table = given
        try:
            table.check(model)
        except ValueError as exc:
            raise PruningError(f"width_table: {exc.args[0].removeprefix('width table: ')}") from None

    def build(removed: list[np.ndarray]) -> nn.Module:
        return apply_plan(model, channel_plan(model, graph, removed)[0])

    if budget is not None and measure is not None:
        quantity = budget.kind
        kept = lambda removed, small: measure.value(removed)  # noqa: E731
    else:  # a ratio prune asks for a fraction of the channels
        quantity = "channels"
        kept = lambda removed, small: 1.0 - sum(len(r) for r in removed) / max(1, graph.n_channels)  # noqa: E731
    chosen, record = choose_round_to(model, table, allocate, build, kept, quantity=quantity)
    if "warning" in record:
        # The caller of prune(): this function, _plan_and_apply, engine_call's wrapper, prune.
        warnings.warn(f"prune: {record['warning']}", PruningShortfallWarning, stacklevel=5)
    return chosen, record


# A prune that keeps more than this (absolute) above a budget's target, or removes less than
# half the channels a ratio asks for, is reported: the user asked for something it did not do.
_BUDGET_SLACK = 0.02
_RATIO_FRACTION = 0.5


def _with_shortfall(plan: PruningPlan, cfg: PruneConfig, budget: Budget | None, graph: DependencyGraph,
                    prunable: int) -> PruningPlan:
    """``plan`` with ``meta["shortfall"]`` (and a :class:`PruningShortfallWarning`) when it
    removes nothing, or far less than ``cfg`` asks; ``plan`` unchanged otherwise."""
    meta = plan.meta
    removed = int(meta.get("channels_removed", 0))
    why = ""
    if budget is not None:
        kept = meta.get(f"{budget.kind}_kept", 1.0 if removed == 0 else None)
        if budget.target < 1.0 and kept is not None and kept > budget.target + _BUDGET_SLACK:
            why = f"keeps {kept:.3f} of the {budget.kind} against target_{budget.kind}={budget.target:g}"
    elif cfg.ratio > 0 or cfg.ratios or cfg.group_ratios:
        asked = cfg.ratio * prunable
        # A few channels' rounding is no shortfall: below 8 asked, only "nothing at all" is.
        if (removed == 0 and (asked >= 1 or cfg.ratios or cfg.group_ratios)) or (asked >= 8 and removed < _RATIO_FRACTION * asked):
            why = f"removed {removed} channels where ratio={cfg.ratio:g} asks for about {asked:.0f}"
        elif removed == 0 and prunable == 0 and graph.n_channels:
            # Nothing can be asked of a model none of whose channels is prunable: still nothing done.
            why = f"removed 0 of {graph.n_channels} channels at ratio={cfg.ratio:g}"
    if not why:
        return plan
    causes = []
    if prunable == 0:
        causes.append("no channel of the model is prunable (graph.unprunable() says why)")
    elif graph.n_channels and prunable < graph.n_channels:
        causes.append(f"{graph.n_channels - prunable} of {graph.n_channels} channels cannot be pruned "
                      "(graph.unprunable() says why)")
    if meta.get("repairs"):
        causes.append(f"{len(meta['repairs'])} group(s) kept whole after validation failures (plan.meta['repairs'])")
    text = why + (": " + "; ".join(causes) if causes else "")
    warnings.warn(f"prune: {text}", PruningShortfallWarning, stacklevel=5)  # the caller of prune()
    return plan.with_meta(shortfall=text)


def _check_inputs(model: nn.Module, example_inputs: Any) -> None:
    """Raise :class:`PruningError` naming ``example_inputs`` (chained from the model's own
    error) when ``model`` cannot run on them: tracing or measuring failed, and only a plain
    forward tells a wrong input (shape, channels) from something the engine does not support.
    Called on that failure path only, so a good call pays no extra forward."""
    try:
        with torch.no_grad(), model_mode(model, "eval"):
            call_model(model, example_inputs)
    except Exception as exc:
        raise PruningError(f"example_inputs of shape {_shapes(example_inputs)}: the model cannot run on them "
                           f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


def _shapes(example_inputs: Any) -> str:
    """The shape of a tensor input, or the shapes of the tensors in a tuple/list/dict of them."""
    if isinstance(example_inputs, torch.Tensor):
        return str(tuple(example_inputs.shape))
    if isinstance(example_inputs, dict):
        return "{" + ", ".join(f"{k!r}: {_shapes(v)}" for k, v in example_inputs.items()) + "}"
    if isinstance(example_inputs, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in example_inputs) + ")"
    return type(example_inputs).__name__


@dataclasses.dataclass
class _BudgetMeasure:
    """How a budget is measured during one prune: on the cost model when it describes the
    model (no pruning per candidate), else by pruning each candidate and measuring it."""

    budget: Budget
    model: nn.Module
    graph: DependencyGraph
    cost: CostModel | None

    @classmethod
    def build(cls, model: nn.Module, graph: DependencyGraph, budget: Budget) -> "_BudgetMeasure":
        """The cost model, checked against the budget's own measure of the original."""
        try:
            # The budget already counted the FLOPs: the cost model need not count them again.
            cost = CostModel(graph, model, latency_table=budget.table,
                             flops=budget.base if budget.kind == "flops" else None)
            if abs(cost.base(budget.kind) - budget.base) <= 1e-6 * max(1.0, budget.base):
                return cls(budget, model, graph, cost)
            log.info("cost model base %s differs from the measured %s: pruning candidates instead",
                     cost.base(budget.kind), budget.base)
        except Exception as exc:  # noqa: BLE001 - any model the formulas miss falls back to measuring
            log.info("cost model unavailable (%s): pruning candidates instead", exc)
        return cls(budget, model, graph, None)

    def value(self, removed: list[np.ndarray]) -> float:
        """Fraction of the budgeted quantity a candidate removal keeps."""
        b = self.budget
        if self.cost is not None:
            return float(self.cost.measure(b.kind, self.cost.mask_of(removed))) / b.base
        return b.measure(apply_plan(self.model, channel_plan(self.model, self.graph, removed)[0])) / b.base

    def kept(self, plan: PruningPlan, pruned: nn.Module) -> float:
        """Fraction the validated result keeps (repairs included): the cost model at the
        plan's mask, which equals the pruned model's count, or the measure of ``pruned``."""
        b = self.budget
        if self.cost is not None:
            return float(self.cost.measure(b.kind, self.cost.mask_of_plan(plan))) / b.base
        return b.measure(pruned) / b.base


def plan_for(model: nn.Module, example_inputs: Any, config: PruneConfig | None = None, *,
             graph: DependencyGraph | None = None, **options: Any) -> PruningPlan:
    """Decide what to remove (and check that it works) without touching ``model``.

    Same options as :func:`prune` (a :class:`PruneConfig` and/or its fields as keywords);
    returns the validated :class:`PruningPlan`, which :func:`prunekit.apply_plan` turns into
    a smaller model.
    """
    p, _ = _plan_and_apply(model, example_inputs, make_config(config, **options), inplace=False, graph=graph)
    return p


def prune(model: nn.Module, example_inputs: Any, config: PruneConfig | None = None, *, inplace: bool = False,
          graph: DependencyGraph | None = None, return_plan: bool = False, **options: Any) -> Any:
    """Return a physically smaller copy of ``model`` (or prune it in place).

    The pruning options are a :class:`prunekit.PruneConfig` (``config``) and/or its fields as
    keywords (``ratio=0.3, ignore=[m.fc]``); keywords override the config's fields, so
    ``prune(m, x, base, ratio=0.3)`` is ``prune(m, x, base.replace(ratio=0.3))``. Unknown or
    invalid options raise :class:`PruningError` naming them. ``inplace``, ``graph`` (a ready
    :func:`trace` result) and ``return_plan`` are about the call, not the pruning.

    ``ratio`` is the fraction of channels removed from every prunable group (ranked within
    the group by ``criterion``), unless ``global_ranking`` ranks normalised scores across
    groups (``global_ranking="raw"``: the scores themselves, when they share one scale). A budget replaces ``ratio``: ``target_flops``, ``target_params`` or
    ``target_latency`` (the fraction kept, e.g. 0.5) is met by bisecting the ratio; latency is
    estimated from a per-layer table measured on the model's device
    (:func:`prunekit.measure.latency_table.build_latency_table`; pass ``latency_table`` to
    reuse one). Data-driven criteria (``taylor``, ``activation``, ...) take
    ``criterion_kwargs={'loader': ..., 'batches': N}``. ``ratios`` maps module names to
    their own ratio and ``group_ratios`` traced groups (the name :func:`trace` prints, or the
    index in ``graph.groups``) to theirs; ``ignore`` lists modules whose output channels stay; ``round_to`` keeps
    channel counts multiples of it (``"auto"``: the multiple that runs fastest here, chosen by timing the
    layers at exact widths on ``round_backend``, or from ``width_table``; never one estimated slower than
    the original; see :mod:`prunekit.allocate.rounding`) and every group keeps ``min_channels``. The result is
    checked by running it: any op whose shape would break makes the groups involved stay (at
    most ``max_repairs`` times), and the plan records why (``plan.meta['repairs']``). On any
    error the user's model is unchanged. With ``return_plan`` the result is ``(model, plan)``.

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18()
    >>> small = prune(m, torch.randn(1, 3, 64, 64), ratio=0.5, ignore=[m.fc])
    >>> small.layer1[0].conv1.out_channels
    32
    >>> prune(m, torch.randn(1, 3, 64, 64), PruneConfig(ratio=0.5, ignore=["fc"])).layer1[0].conv1.out_channels
    32
    """
    p, pruned = _plan_and_apply(model, example_inputs, make_config(config, **options), inplace=inplace, graph=graph)
    if pruned is model and not inplace:
        pruned = copy_module(model)
    return (pruned, p) if return_plan else pruned
