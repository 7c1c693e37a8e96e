"""Channel Pruning (He, Zhang & Sun, ICCV 2017): LASSO channel selection + least squares.

The paper's algorithm, layer by layer through the network (its Algorithm / Section 3):
  1. for the next layer, sample receptive fields of its inputs ``X'`` in the *partially pruned*
     network (earlier layers already pruned and reconstructed) and its outputs ``Y`` in the
     *original* network;
  2. select the ``k`` channels to keep by LASSO: ``min ||Y - sum_c beta_c X'_c W_c^T||^2 +
     lambda ||beta||_1``, ``lambda`` raised until only ``k`` channels have ``beta_c != 0``;
  3. remove the others, and reconstruct the layer's weights by least squares from the kept
     ``X'`` to ``Y``; go on to the next layer.

Here (``layerwise=True``, the default) a "layer" is a coupled group of channels (a residual
stage is one problem, all its consumers stacked) and the groups are visited in the order in
which their first consumer runs. Step 2 is the exact positive-LASSO path by LARS from the
sufficient statistics of every sampled row (:func:`prunekit.criteria.reconstruction.lasso_scores_towards`):
its support with exactly ``k`` channels is the set the authors reach by bisecting ``lambda``.
How many channels each group keeps (``k``) comes from the budget: the ordinary allocator, run
once on the original network with the ``lasso`` criterion, decides the counts; the layer-by-layer
pass decides which channels.

``layerwise=False`` is the faster one-shot variant: selection by the ``lasso`` criterion on the
*original* network for all groups at once, then sequential least-squares reconstruction.

Departures from the paper:
  * the paper alternates LASSO and least squares until ``beta`` is stable; here one LASSO
    selection is followed by one least-squares reconstruction per group;
  * no multi-branch correction: a residual block's consumer is reconstructed towards its own
    original output, not towards the block output with the shortcut's error added
    (``Y1 - Y1' + Y2``); and residual stages are pruned too (the paper prunes only the first
    layer of each block and keeps the stage width);
  * the per-group counts come from the budget's allocator, not from the paper's hand-set
    per-layer ratios.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
from torch import nn

import prunekit as pk
from prunekit.config import PruneConfig
from prunekit.criteria import l2
from prunekit.criteria.reconstruction import consumer_layers, lasso_scores_towards
from prunekit.errors import PruningError
from prunekit.features import Batch, call_with_hooks
from prunekit.graph import DependencyGraph, module_names
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.plan import PruningPlan, compose
from prunekit.planning import channel_plan, removed_channels
from prunekit.recover.reconstruct import pair_moments, reconstruct
from prunekit.surgery import apply_plan


@register("channel_pruning")
def channel_pruning(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
                    batches: int = 8, positions: int = 16, reconstruct_layers: bool = True,
                    layerwise: bool = True, seed: int = 0, **kwargs: Any) -> MethodResult:
    """Prune ``model`` by LASSO selection and least-squares reconstruction (He et al. 2017)
    under the budget in ``kwargs`` (see :func:`prunekit.methods.budget_config`), group by group
    on the partially pruned network (``layerwise``, the paper) or all groups at once on the
    original; ``positions`` receptive fields per image are sampled from ``batches`` batches of
    ``loader``. Returns the pruned, reconstructed model and its plan (relative to ``model``)."""
    cfg = budget_config(kwargs, "channel_pruning")
    if cfg.ignore:  # names stay valid in every pruned copy; module objects do not
        cfg = cfg.replace(ignore=module_names(model, list(cfg.ignore), "ignore"))
    if layerwise and not reconstruct_layers:
        raise PruningError("channel_pruning: layerwise=True reconstructs every group as it goes; "
                           "reconstruct_layers=False needs layerwise=False")
    calib = take_batches(loader, batches, "channel_pruning")
    small, plan = pk.prune(model, example_inputs, config=cfg, criterion="lasso",
                           criterion_kwargs={"loader": calib, "batches": len(calib), "seed": seed}, return_plan=True)
    if not layerwise:
        layers = reconstruct(small, model, plan, calib, mode="sequential", positions=positions, seed=seed) \
            if reconstruct_layers else []
        return MethodResult(small, plan, {"criterion": "lasso", "selection": "oneshot", "reconstructed": layers})
    pruned, steps, layers, order = _layer_by_layer(model, example_inputs, cfg, plan, calib, positions, seed)
    want = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    if got != want:  # same counts per group as the allocation, so the same architecture
        raise PruningError("channel_pruning: the layer-by-layer pass did not reach the allocated architecture")
    final = PruningPlan(steps.steps, {**plan.meta, "selection": "layerwise"})
    return MethodResult(pruned, final, {"criterion": "lasso", "selection": "layerwise", "order": order,
                                        "reconstructed": layers})


def _layer_by_layer(model: nn.Module, example_inputs: Any, cfg: PruneConfig, allocation: PruningPlan,
                    calib: list[Batch], positions: int, seed: int) -> tuple[nn.Module, PruningPlan, list[str], list[str]]:
    """Steps 1-3 of the module docstring for every group ``allocation`` prunes, in execution
    order. Returns the pruned model, the composed plan, the reconstructed layers and the order
    of the groups."""
    graph0 = pk.trace(model, example_inputs, ignore=cfg.ignore)
    counts = {g.name: len(r) for g, r in zip(graph0.groups, removed_channels(graph0.groups, allocation)) if len(r)}
    order = [name for name in _execution_order(model, graph0, calib[0]) if name in counts]
    current, total, layers = copy.deepcopy(model), PruningPlan(), []
    for name in order:
        graph = pk.trace(current, example_inputs, ignore=cfg.ignore)
        group = next((g for g in graph.groups if g.name == name), None)
        if group is None or group.n_prunable < counts[name]:
            raise PruningError(f"channel_pruning: group {name} is not prunable the same way after the earlier groups")
        ran = {c.name for c in graph.state.calls["eval"]}  # an attention's out_proj is used, never called
        consumers = [c for c in consumer_layers(current, group) if c[0] in ran]
        moments = pair_moments(current, model, total, calib, [n for n, _, _ in consumers], positions, seed)
        problems = [(mod.weight.detach().cpu().flatten(1), mod.bias.detach().cpu() if mod.bias is not None else None,
                     mom, chan) for (_, mod, chan), mom in zip(consumers, moments)]
        # A group no layer reads linearly (none to reconstruct) falls back as the lasso criterion does.
        scores = lasso_scores_towards(problems, group.size) if problems else np.asarray(l2(current, group), float)
        scores = np.where(group.prunable, scores, np.inf)
        drop = np.sort(np.argsort(scores, kind="stable")[: counts[name]])
        removed = [drop if g.index == group.index else np.zeros(0, dtype=np.int64) for g in graph.groups]
        step, _ = channel_plan(current, graph, removed, {"channels_removed": len(drop), "channels": graph.n_channels,
                                                         "group": name})
        current = apply_plan(current, step)
        total = compose(total, step) if not total.is_empty else step
        layers += reconstruct(current, model, total, calib, layers=[n for n, _, _ in consumers],
                              positions=positions, seed=seed)
    return current, total, layers, order


def _execution_order(model: nn.Module, graph: DependencyGraph, batch: Batch) -> list[str]:
    """Names of ``graph``'s groups in the order their first consumer layer runs on ``batch``
    (groups no layer consumes last, in graph order)."""
    calls: dict[str, int] = {}
    mods = dict(model.named_modules())
    layer_groups = {g.name: [n for n, _, _ in consumer_layers(model, g)] for g in graph.groups}

    def note(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:  # returns None: the input is left as it is
            calls.setdefault(name, len(calls))
        return hook

    handles = [mods[n].register_forward_pre_hook(note(n)) for n in {n for names in layer_groups.values() for n in names}]
    call_with_hooks(model, batch[0], handles)
    first = {g: min((calls.get(n, len(mods)) for n in names), default=len(mods)) for g, names in layer_groups.items()}
    return sorted(first, key=lambda g: first[g])
