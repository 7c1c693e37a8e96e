"""Data-driven criteria: first-order Taylor, activation statistics (mean, APoZ).

They need calibration data: pass ``loader=`` (any iterable of ``(inputs, targets)`` pairs or
of input tensors) and ``batches=`` (how many to use; default 8). Statistics for *all* groups
are gathered in one pass over the data and cached for the other groups of the same call.

Activation statistics are read at the channel's *activation output* on the producer side:
the output of the activation module (ReLU, GELU, ...) that takes the output of the group's
normalisation layers, or of its producing layers where it has none (conv -> BN -> ReLU is
read after the ReLU, where APoZ is defined, and before any pooling). A group for which some
producer has no such activation module (a residual sum sits in between, or the activation is
a function call rather than a module) falls back to the input of its consumers (after any
pooling), and a group without consumers to the output of its producers; the fallback is
reported (``plan.meta["criterion_fallbacks"]``, see :func:`prunekit.criteria.report_fallback`).
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


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Sigmoid, nn.Tanh)
"""Elementwise activation modules whose output is a group's activation output."""


def _predecessors(model: nn.Module, group: ChannelGroup) -> list[tuple[str, nn.Module, np.ndarray]]:
    """(module name, module, channel map) of the layers whose outputs the group's activation
    takes: its normalisation layers, or its producing filter layers where it has none."""
    norms = []
    for m in group.members:
        name, leaf = _module_of(m.tensor)
        if m.role != "norm" or leaf != "weight":
            continue
        mod = model.get_submodule(name) if name else model
        handler = handler_for(mod)
        if handler is not None and handler.is_norm:
            norms.append((name, mod, m.channel))
    return norms or _weight_members(model, group, "out")


class _Sites:
    """Where each group's activations are observed: activation outputs after its norms or
    producers (decided on the first batch, see :meth:`settle`), else consumer inputs, else
    producer outputs."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.preds = {g.index: _predecessors(model, g) for g in groups}
        self.fallback: dict[int, tuple[str, list[tuple[str, nn.Module, np.ndarray]]]] = {}
        for g in groups:
            sites, kind = _weight_members(model, g, "in"), "in"
            if not sites:
                sites, kind = _weight_members(model, g, "out"), "out"
            self.fallback[g.index] = (kind, sites)
        self.modules = {name: mod for _, sites in self.fallback.values() for name, mod, _ in sites}
        self.pred_modules = {name: mod for preds in self.preds.values() for name, mod, _ in preds}
        self.by_module: dict[str, list[tuple[int, np.ndarray, str]]] | None = None
        self.reasons: dict[int, str] = {}

    def kinds(self, name: str) -> set[str]:
        """The fallback kinds ('in', 'out') that may be read at filter module ``name``."""
        return {kind for kind, sites in self.fallback.values() if any(n == name for n, _, _ in sites)}

    def settle(self, captured: dict[str, Tensor]) -> None:
        """Fix every group's sites from the first batch's captures: its activation outputs
        if every predecessor's output went through an activation module, else its fallback
        sites (the reason is kept in ``reasons``)."""
        self.by_module = {}
        for gi, preds in self.preds.items():
            if preds and all(f"{name}:act" in captured for name, _, _ in preds):
                for name, _, chan in preds:
                    self.by_module.setdefault(name, []).append((gi, chan, "act"))
                continue
            kind, sites = self.fallback[gi]
            missing = [name for name, _, _ in preds if f"{name}:act" not in captured]
            where = "consumer input" if kind == "in" else "producer output"
            self.reasons[gi] = (f"activation statistics read at the {where}: no activation module takes the output "
                                f"of {', '.join(repr(n) for n in missing) or 'a producer'}")
            for name, _, chan in sites:
                self.by_module.setdefault(name, []).append((gi, chan, kind))

    def module(self, name: str) -> nn.Module:
        """The filter or normalisation module named ``name`` (the one a view's channels follow)."""
        return self.modules.get(name) or self.pred_modules[name]


def site_views(model: nn.Module, groups: list[ChannelGroup], batches: Iterable[Batch], *,
               with_grad: bool = False, fallbacks: dict[int, str] | None = None
               ) -> Iterator[tuple[int, np.ndarray, Tensor]]:
    """Run the batches with hooks at every observation site of ``groups`` and yield, per
    batch and site, ``(group index, channel map, view)``: ``view`` is the activation as
    ``(samples, channels, positions)`` (times its gradient of the task loss with
    ``with_grad``), and ``channel map[i]`` the group channel of view channel ``i`` (-1: none).
    ``fallbacks``, when given, receives group index -> why the group's activations are not
    read at its activation output (see the module docstring)."""
    sites = _Sites(model, groups)
    captured: dict[str, Tensor] = {}
    # Outputs of the groups' norms/producers in this forward, by id: an activation module
    # whose input is one of them gives that layer's activation output. A module may be called
    # several times (torchvision's BasicBlock reuses one ReLU), so each call is matched.
    pending: dict[int, tuple[str, Tensor]] = {}
    calling: dict[int, str] = {}
    handles = []

    def keep(key: str, t: Tensor) -> None:
        captured[key] = t
        if with_grad and t.requires_grad:
            t.retain_grad()

    def filter_hooks(name: str) -> tuple[Callable[..., None], Callable[..., None]]:
        kinds = sites.kinds(name)

        def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if "in" in kinds:
                keep(name + ":in", args[0])

        def post(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            if "out" in kinds:
                keep(name + ":out", out)
        return pre, post

    def pred_hook(name: str) -> Callable[..., None]:
        def post(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            if isinstance(out, Tensor):
                pending[id(out)] = (name, out)
        return post

    def act_pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        hit = pending.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
        if hit is not None and hit[1] is args[0]:
            calling[id(mod)] = hit[0]

    def act_post(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        name = calling.pop(id(mod), None)
        if name is not None:
            keep(name + ":act", out)

    for name, mod in sites.modules.items():
        pre, post = filter_hooks(name)
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    for name, mod in sites.pred_modules.items():
        handles.append(mod.register_forward_hook(pred_hook(name)))
    for mod in model.modules():
        if isinstance(mod, ACTIVATIONS):
            handles += [mod.register_forward_pre_hook(act_pre), mod.register_forward_hook(act_post)]
    try:
        with model_mode(model, "eval"):
            for x, y in batches:
                captured.clear()
                pending.clear()
                with torch.set_grad_enabled(with_grad):
                    out = call_on_device(model, x)
                    if with_grad:
                        model.zero_grad(set_to_none=True)
                        task_loss(out, y).backward()
                pending.clear()
                if sites.by_module is None:
                    sites.settle(captured)
                    if fallbacks is not None:
                        fallbacks.update(sites.reasons)
                for name, entries in sites.by_module.items():
                    mod = sites.module(name)
                    for gi, chan, kind in entries:
                        t = captured.get(f"{name}:{kind}")
                        if t is None or (with_grad and t.grad is None):
                            continue
                        v = t * t.grad if with_grad else t
                        yield gi, chan, _channel_view(v.detach(), mod, "in" if kind == "in" else "out")
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)


def _observe(model: nn.Module, groups: list[ChannelGroup], batches: Iterable[Batch], *,
             stat: Callable[[Tensor], Tensor], with_grad: bool,
             fallbacks: dict[int, str] | None = None) -> dict[int, np.ndarray]:
    """Per group index, the sum over batches and sites of ``stat(view)`` (one value per
    observed channel, see :func:`site_views`) mapped to the group's channels; ``fallbacks``
    receives the groups read elsewhere than at their activation output. A group none of whose
    sites ever ran has no entry."""
    sizes = {g.index: g.size for g in groups}
    totals: dict[int, np.ndarray] = {}
    for gi, chan, view in site_views(model, groups, batches, with_grad=with_grad, fallbacks=fallbacks):
        vals = stat(view).double().cpu().numpy()
        ok = chan >= 0
        np.add.at(totals.setdefault(gi, np.zeros(sizes[gi])), chan[ok], vals[ok])
    return totals


def _cached(ctx: dict[str, Any], key: str, compute: Callable[[], dict[int, Any]]) -> dict[int, Any]:
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
    fallbacks = _cached(ctx, name + ":fallbacks", dict)  # filled by the observation below
    totals = _cached(ctx, name, lambda: _observe(
        model, groups, calibration_batches(ctx.get("loader"), batches, name), stat=stat, with_grad=with_grad,
        fallbacks=fallbacks))
    report_site_fallback(name, group, fallbacks, ctx)
    if group.index not in totals:
        return unobserved_fallback(name, model, group, ctx)
    return totals[group.index]


def unobserved_fallback(criterion: str, model: nn.Module, group: ChannelGroup, ctx: dict[str, Any]) -> np.ndarray:
    """``l2`` scores for a group whose activations no site saw (no layer reading or writing its
    channels runs its own forward: ``nn.MultiheadAttention``'s heads, inside one fused call),
    reported as a fallback instead of all-zero statistics."""
    from prunekit.criteria import l2, report_fallback

    report_fallback(ctx, group, f"{criterion} -> l2: no layer that reads or writes the group's channels runs "
                                "a forward of its own to observe")
    return l2(model, group, **ctx)


def report_site_fallback(criterion: str, group: ChannelGroup, fallbacks: dict[int, str], ctx: dict[str, Any]) -> None:
    """Report (see :func:`prunekit.criteria.report_fallback`) that ``criterion`` read
    ``group`` elsewhere than at its activation output, when ``fallbacks`` says so."""
    from prunekit.criteria import report_fallback

    if group.index in fallbacks:
        report_fallback(ctx, group, f"{criterion}: {fallbacks[group.index]}")


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
