"""Data-driven criteria: first-order Taylor, activation statistics (mean, APoZ).

They need calibration data: pass ``loader=`` (any iterable of ``(inputs, targets)`` pairs or
of input tensors) and ``batches=`` (how many to use; default 8). Statistics for *all* groups
are gathered in one pass over the data and cached for the other groups of the same call.

Activation statistics are read where the channel is *consumed*: the input of the next
conv/linear layer, i.e. after BN and the non-linearity (where APoZ is defined). A group with
no such consumer falls back to the output of its producing layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import PruningError
from prunekit.features import Batch, as_batch, call_on_device
from prunekit.graph.dependency import ChannelGroup
from prunekit.handlers import handler_for
from prunekit.runtime import model_mode

DEFAULT_BATCHES = 8


def calibration_batches(loader: Iterable[Any] | None, batches: int, criterion: str) -> Iterator[Batch]:
    """Yield up to ``batches`` ``(inputs, targets or None)`` pairs from ``loader``; a missing
    loader raises a :class:`PruningError` naming the criterion that needs it."""
    if loader is None:
        raise PruningError(f"criterion '{criterion}' needs calibration data: pass criterion_kwargs="
                           f"{{'loader': ..., 'batches': N}} (it uses {DEFAULT_BATCHES} batches by default)")
    if batches < 1:
        raise PruningError(f"criterion '{criterion}': batches={batches} must be >= 1")
    for item in itertools.islice(loader, batches):
        yield as_batch(item)


def task_loss(output: Any, target: Tensor | None) -> Tensor:
    """Cross-entropy against ``target``; without targets, against the model's own argmax
    (a label-free proxy). The first tensor of a tuple/dict output is used."""
    if isinstance(output, dict):
        output = next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        output = output[0]
    logits = output.flatten(1) if output.ndim > 2 else output
    if target is None:
        target = logits.detach().argmax(1)
    return F.cross_entropy(logits, target.to(logits.device))


def _module_of(tensor: str) -> tuple[str, str]:
    mod, _, leaf = tensor.rpartition(".")
    return mod, leaf


def _weight_members(model: nn.Module, group: ChannelGroup, role: str) -> list[tuple[str, nn.Module, np.ndarray]]:
    """(module name, module, channel map) of filter weights (conv/linear, by their handler)
    that carry the group's channels as outputs (``role='out'``) or as inputs (``role='in'``,
    ungrouped layers only), with filters along weight dim 0 so that the activation's channel
    dim lines up with the weight's (not transposed convs)."""
    out = []
    for m in group.members:
        name, leaf = _module_of(m.tensor)
        if m.role != role or leaf != "weight":
            continue
        mod = model.get_submodule(name) if name else model
        handler = handler_for(mod)
        if handler is None or not handler.has_filters or handler.weight_dims(mod)[0] != 0:
            continue
        if role == "in" and getattr(mod, "groups", 1) != 1:
            continue
        out.append((name, mod, m.channel))
    return out


def _channel_view(t: Tensor, mod: nn.Module, kind: str) -> Tensor:
    """Activation (the module's input for ``kind='in'``, output for ``'out'``) as
    ``(samples, channels, positions)``, its channels where the module's handler says: a layer
    with channels last (linear) makes every position a sample, otherwise the dims before the
    channel dim are samples and those after it positions."""
    handler = handler_for(mod)
    assert handler is not None  # sites are filter layers, which have handlers
    d = (handler.in_channel_dim if kind == "in" else handler.out_channel_dim)(mod, t.ndim)
    assert d is not None
    if d == t.ndim - 1:
        return t.reshape(-1, t.shape[-1]).unsqueeze(-1)
    samples = t.flatten(0, d - 1) if d > 0 else t.unsqueeze(0)
    return samples.flatten(2)


class _Sites:
    """Where each group's activations are observed: consumer inputs, else producer outputs."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.by_module: dict[str, list[tuple[int, np.ndarray, str]]] = {}
        self.modules: dict[str, nn.Module] = {}
        for g in groups:
            sites, kind = _weight_members(model, g, "in"), "in"
            if not sites:
                sites, kind = _weight_members(model, g, "out"), "out"
            for name, mod, chan in sites:
                self.modules[name] = mod
                self.by_module.setdefault(name, []).append((g.index, chan, kind))


def site_views(model: nn.Module, groups: list[ChannelGroup], batches: Iterable[Batch], *,
               with_grad: bool = False) -> Iterator[tuple[int, np.ndarray, Tensor]]:
    """Run the batches with hooks at every observation site of ``groups`` and yield, per
    batch and site, ``(group index, channel map, view)``: ``view`` is the activation as
    ``(samples, channels, positions)`` (times its gradient of the task loss with
    ``with_grad``), and ``channel map[i]`` the group channel of view channel ``i`` (-1: none)."""
    sites = _Sites(model, groups)
    captured: dict[str, Tensor] = {}
    handles = []

    def hooks_for(name: str) -> tuple[Callable[..., None], Callable[..., None]]:
        kinds = {k for _, _, k in sites.by_module[name]}

        def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if "in" in kinds:
                captured[name + ":in"] = args[0]
                if with_grad and args[0].requires_grad:
                    args[0].retain_grad()

        def post(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            if "out" in kinds:
                captured[name + ":out"] = out
                if with_grad and out.requires_grad:
                    out.retain_grad()
        return pre, post

    for name, mod in sites.modules.items():
        pre, post = hooks_for(name)
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        with model_mode(model, "eval"):
            for x, y in batches:
                captured.clear()
                with torch.set_grad_enabled(with_grad):
                    out = call_on_device(model, x)
                    if with_grad:
                        model.zero_grad(set_to_none=True)
                        task_loss(out, y).backward()
                for name, entries in sites.by_module.items():
                    mod = sites.modules[name]
                    for gi, chan, kind in entries:
                        t = captured.get(f"{name}:{kind}")
                        if t is None or (with_grad and t.grad is None):
                            continue
                        v = t * t.grad if with_grad else t
                        yield gi, chan, _channel_view(v.detach(), mod, kind)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)


def _observe(model: nn.Module, groups: list[ChannelGroup], batches: Iterable[Batch], *,
             stat: Callable[[Tensor], Tensor], with_grad: bool) -> dict[int, np.ndarray]:
    """Per group index, the sum over batches and sites of ``stat(view)`` (one value per
    observed channel, see :func:`site_views`) mapped to the group's channels."""
    totals = {g.index: np.zeros(g.size) for g in groups}
    for gi, chan, view in site_views(model, groups, batches, with_grad=with_grad):
        vals = stat(view).double().cpu().numpy()
        ok = chan >= 0
        np.add.at(totals[gi], chan[ok], vals[ok])
    return totals


def _cached(ctx: dict[str, Any], key: str, compute: Callable[[], dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
    cache = ctx.get("_cache")
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _all_groups(group: ChannelGroup, ctx: dict[str, Any]) -> list[ChannelGroup]:
    groups = ctx.get("groups")
    return list(groups) if groups else [group]


def _activation_stat(name: str, stat: Callable[[Tensor], Tensor], with_grad: bool,
                     model: nn.Module, group: ChannelGroup, ctx: dict[str, Any]) -> np.ndarray:
    groups = _all_groups(group, ctx)
    batches = int(ctx.get("batches", DEFAULT_BATCHES))
    totals = _cached(ctx, name, lambda: _observe(
        model, groups, calibration_batches(ctx.get("loader"), batches, name), stat=stat, with_grad=with_grad))
    return totals[group.index]


def mean_activation_stat(v: Tensor) -> Tensor:
    """Per channel: mean |activation| over samples and positions."""
    return v.abs().mean((0, 2))


def nonzero_fraction_stat(v: Tensor) -> Tensor:
    """Per channel: fraction of non-zero activations (1 - APoZ)."""
    return (v != 0).double().mean((0, 2))


def taylor_act_stat(v: Tensor) -> Tensor:
    """Per channel: |mean over positions of activation x gradient|, averaged over samples
    (Molchanov et al. 2017)."""
    return v.mean(2).abs().mean(0)


def weight_taylor(model: nn.Module, groups: list[ChannelGroup], batches: Iterable[Batch]) -> dict[int, np.ndarray]:
    """Per group: sum over batches of ``(sum over the channel's parameters of w * dL/dw)^2``,
    the first-order estimate of the loss change from removing the whole coupled channel
    (Molchanov et al. 2019, with the group's slices summed before squaring)."""
    params = dict(model.named_parameters())
    totals = {g.index: np.zeros(g.size) for g in groups}
    try:
        with model_mode(model, "eval"):
            for x, y in batches:
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    task_loss(call_on_device(model, x), y).backward()
                for g in groups:
                    contrib = np.zeros(g.size)
                    for m in g.members:
                        p = params.get(m.tensor)
                        if p is None or p.grad is None:
                            continue
                        wg = (p.detach() * p.grad).movedim(m.dim, 0).reshape(p.shape[m.dim], -1).sum(1)
                        ok = m.channel >= 0
                        np.add.at(contrib, m.channel[ok], wg.double().cpu().numpy()[ok])
                    totals[g.index] += contrib ** 2
    finally:
        model.zero_grad(set_to_none=True)
    return totals


def taylor_weight_scores(model: nn.Module, group: ChannelGroup, ctx: dict[str, Any]) -> np.ndarray:
    """Weight-Taylor scores of ``group`` (computed for all groups of the call at once)."""
    groups = _all_groups(group, ctx)
    batches = int(ctx.get("batches", DEFAULT_BATCHES))
    totals = _cached(ctx, "taylor", lambda: weight_taylor(
        model, groups, calibration_batches(ctx.get("loader"), batches, "taylor")))
    return totals[group.index]


def activation_scores(name: str, model: nn.Module, group: ChannelGroup, ctx: dict[str, Any]) -> np.ndarray:
    """Scores of the activation criterion ``name`` ('activation', 'apoz' or 'taylor_act')."""
    stat, grad = {"activation": (mean_activation_stat, False), "apoz": (nonzero_fraction_stat, False),
                  "taylor_act": (taylor_act_stat, True)}[name]
    return _activation_stat(name, stat, grad, model, group, ctx)
