"""Channel importance criteria, in a registry users can extend.

A criterion maps ``(model, group)`` to one score per channel of the group (higher = more
important). Register your own with :func:`register`; ``prunekit.prune(criterion="name")``
then finds it::

    @prunekit.criteria.register("my_l1")
    def my_l1(model, group, **ctx):
        return prunekit.criteria.reduce_members(model, group, lambda w: w.abs().sum(1))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from prunekit._perf import named_tensors
from prunekit.graph.dependency import ChannelGroup
from prunekit.handlers import handler_for
from prunekit.registry import Registry


class Criterion(Protocol):
    """Scores the channels of one group: returns a float array of length ``group.size``."""

    def __call__(self, model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray: ...


_CRITERIA: Registry[Criterion] = Registry("criterion")
_REGISTRY = _CRITERIA.items  # name -> criterion


def register(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator registering a criterion under ``name`` (overwriting is an error)."""
    return _CRITERIA.register(name)


def get(name: str) -> Criterion:
    """Return the criterion registered as ``name``; unknown names raise KeyError listing all."""
    return _CRITERIA.get(name)


def list_criteria(pattern: str = "*") -> list[str]:
    """Names of registered criteria matching a glob pattern."""
    return _CRITERIA.names(pattern)


def tensor_of(model: nn.Module, name: str) -> Tensor:
    """Parameter or buffer of ``model`` by qualified name."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return getattr(mod, leaf)


def reduce_members(model: nn.Module, group: ChannelGroup, per_index: Callable[[Tensor], Tensor], *,
                   roles: tuple[str, ...] = ("out", "in", "norm"), parameters_only: bool = True) -> np.ndarray:
    """Sum a per-index statistic over the group's members into one score per channel.

    ``per_index`` receives each member tensor with the pruned dim moved first and flattened
    to 2-D ``(size, -1)`` and returns one value per index.
    """
    scores = np.zeros(group.size, dtype=np.float64)
    params = parameter_map(model) if parameters_only else {}
    for m in group.members:
        if m.role not in roles or (parameters_only and m.tensor not in params):
            continue
        t = tensor_of(model, m.tensor).detach().float()
        flat = t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1)
        vals = per_index(flat).double().cpu().numpy()
        ok = m.channel >= 0
        np.add.at(scores, m.channel[ok], vals[ok])
    return scores


REDUCTIONS = ("sum", "mean", "max")


def parameter_map(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter of ``model`` by qualified name (aliases included)."""
    return {name: t for name, _, _, t in named_tensors(model, ("_parameters",))}


_SMALL = 1 << 16  # CPU tensors up to this size are reduced in numpy: less per-call overhead
_CHUNK = 1 << 18  # elements per block when reducing over a non-leading dim


def slice_norms(t: Tensor, dim: int, p: int) -> np.ndarray:
    """``||t.select(dim, i)||_p ** p`` for every index ``i`` of ``dim``, as a float64 array.

    Reductions over a non-leading dim of a big weight (a conv's input channels) are slow
    when strided, so the tensor is viewed as ``(outer, size, inner)``, reduced over its
    contiguous inner extent first, a block of outer rows at a time."""
    t = t.detach()
    size = t.shape[dim]
    outer = math.prod(t.shape[:dim])
    if t.device.type == "cpu" and t.numel() <= _SMALL and t.dtype in (torch.float32, torch.float64):
        a = np.abs(t.numpy().reshape(outer, size, -1).astype(np.float64))
        return (a * a if p == 2 else a ** p).sum(axis=(0, 2))
    t = t.float()
    if t.ndim == 1:
        return t.abs().double().pow(p).cpu().numpy()
    if dim == 0:
        return torch.linalg.vector_norm(t.reshape(size, -1), ord=p, dim=1).double().pow(p).cpu().numpy()
    # Powers of a few leading rows at a time: one full-size temporary would cost more in
    # fresh-memory page faults than the arithmetic (a VGG classifier weight is 400 MB).
    v = t.reshape(outer, size, -1)
    rows = max(1, _CHUNK // (size * v.shape[2]))
    acc = torch.zeros(size, dtype=torch.float64, device=t.device)
    for blk in v.split(rows):
        acc += (blk.square() if p == 2 else blk.abs().pow(p)).sum(2).sum(0)
    return acc.cpu().numpy()


def norm_members(model: nn.Module, group: ChannelGroup, p: int, *, roles: tuple[str, ...] = ("out", "in", "norm"),
                 reduction: str = "sum", params: dict[str, Tensor] | None = None) -> np.ndarray:
    """``||slice||_p ** p`` per channel, aggregated over the group's parameter members by
    ``reduction``: 'sum' (the norm of everything the channel owns), 'mean' (per member) or
    'max' (its strongest member). ``params`` (from :func:`parameter_map`) saves recomputing
    the model's parameter names for every group."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: one of {', '.join(REDUCTIONS)}")
    params = parameter_map(model) if params is None else params
    chans, vals = [], []
    for m in group.members:
        if m.role not in roles or m.tensor not in params:
            continue
        ok = m.channel >= 0
        chans.append(m.channel[ok])
        vals.append(slice_norms(params[m.tensor], m.dim, p)[ok])
    scores = np.zeros(group.size, dtype=np.float64)
    if not chans:
        return scores
    c, v = np.concatenate(chans), np.concatenate(vals)
    if reduction == "max":
        np.maximum.at(scores, c, v)
        return scores
    # bincount sums indices that repeat (a channel used twice by one tensor)
    scores = np.bincount(c, weights=v, minlength=group.size)
    return scores / np.maximum(np.bincount(c, minlength=group.size), 1.0) if reduction == "mean" else scores


def _params(model: nn.Module, ctx: dict[str, Any]) -> dict[str, Tensor] | None:
    """The model's parameters by name, gathered once per :func:`score_groups` call."""
    cache = ctx.get("_cache")
    if cache is None:
        return None
    if "parameters" not in cache:
        cache["parameters"] = parameter_map(model)
    return cache["parameters"]


@register("l1")
def l1(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """Sum of absolute weights of every slice the channel owns, over the whole group
    (``reduction='mean'|'max'`` aggregates per member instead)."""
    return norm_members(model, group, 1, reduction=ctx.get("reduction", "sum"), params=_params(model, ctx))


@register("l2")
def l2(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """Group L2 norm: sqrt of the sum of squared weights of every slice the channel owns."""
    return np.sqrt(norm_members(model, group, 2, reduction=ctx.get("reduction", "sum"), params=_params(model, ctx)))


@register("l1_out")
def l1_out(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """Classic filter L1 norm (Li et al. 2017): producers' filters only."""
    return norm_members(model, group, 1, roles=("out",), reduction=ctx.get("reduction", "sum"),
                        params=_params(model, ctx))


@register("l2_out")
def l2_out(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """Filter L2 norm: sqrt of the sum of squares of the producers' filters (role 'out')
    only, the L2 counterpart of ``l1_out``."""
    return np.sqrt(norm_members(model, group, 2, roles=("out",), reduction=ctx.get("reduction", "sum"),
                                params=_params(model, ctx)))


def report_fallback(ctx: dict[str, Any], group: ChannelGroup, message: str) -> None:
    """Record that a criterion scored ``group`` otherwise than its name says (``message``,
    e.g. ``"bn -> l2: no normalisation layer"``): :func:`score_groups` collects these per
    group name and :func:`prunekit.prune` puts them in ``plan.meta["criterion_fallbacks"]``.
    A no-op when the criterion is called outside :func:`score_groups`, and for groups with
    no prunable channel (their scores decide nothing)."""
    sink = ctx.get("_fallbacks")
    if sink is not None and group.n_prunable > 0:
        sink[group.name] = message


@register("bn")
def bn_scale(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """BN-gamma criterion: |gamma| of the normalisation layers in the group, summed over
    them. It is the importance Network Slimming (Liu et al. 2017) prunes by, but without that
    method's L1 sparsity training of gamma. A group without a normalisation layer is scored
    by ``l2`` instead (reported as a fallback)."""
    scores = np.zeros(group.size, dtype=np.float64)
    found = False
    for m in group.members:
        mod_name, _, leaf = m.tensor.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        handler = handler_for(mod)
        if leaf == "weight" and handler is not None and handler.is_norm:
            vals = getattr(mod, leaf).detach().abs().double().cpu().numpy()
            ok = m.channel >= 0
            np.add.at(scores, m.channel[ok], vals[ok])
            found = True
    if found:
        return scores
    report_fallback(ctx, group, "bn -> l2: no normalisation layer")
    return l2(model, group, **ctx)


@register("fpgm")
def fpgm(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """Filter pruning via geometric median (He et al. 2019): a channel whose filters lie close
    to all others (small summed distance, i.e. near the geometric median) is redundant.

    The channel's vector is the concatenation of its producer filters over the whole group
    (every member with role 'out'; all members if there is none); the score is the sum of
    Euclidean distances to the other channels' vectors.
    """
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    members = [m for m in group.members if m.role == "out" and m.tensor in params] or \
        [m for m in group.members if m.tensor in params]
    parts = []
    for m in members:
        t = tensor_of(model, m.tensor).detach().double()
        flat = t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1)
        block = torch.zeros(group.size, flat.shape[1], dtype=torch.float64)
        ok = torch.as_tensor(m.channel >= 0)
        block[torch.as_tensor(m.channel[m.channel >= 0])] = flat[ok].cpu()
        parts.append(block)
    if not parts:
        return np.zeros(group.size)
    vecs = torch.cat(parts, 1)
    return torch.cdist(vecs, vecs).sum(1).numpy()


@register("taylor")
def taylor(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """First-order Taylor on weights (Molchanov et al. 2019): per calibration batch,
    ``(sum of w * dL/dw over every slice the channel owns)^2``, summed over batches.
    Needs ``loader=`` (and optionally ``batches=``, default 8)."""
    from prunekit.criteria.data import taylor_weight_scores

    return taylor_weight_scores(model, group, ctx)


@register("taylor_act")
def taylor_act(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """First-order Taylor on activations (Molchanov et al. 2017): |mean over positions of
    activation x gradient|, averaged over samples, at the activation output (see
    :mod:`prunekit.criteria.data`). Needs ``loader=``."""
    from prunekit.criteria.data import activation_scores

    return activation_scores("taylor_act", model, group, ctx)


@register("activation")
def mean_activation(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """Mean absolute activation of the channel at its activation output (see
    :mod:`prunekit.criteria.data`). Needs ``loader=``."""
    from prunekit.criteria.data import activation_scores

    return activation_scores("activation", model, group, ctx)


@register("apoz")
def apoz(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """1 - APoZ (Hu et al. 2016): the fraction of non-zero values at the channel's activation
    output (after the ReLU, before pooling; see :mod:`prunekit.criteria.data`); channels that
    are mostly zero score low. Needs ``loader=``."""
    from prunekit.criteria.data import activation_scores

    return activation_scores("apoz", model, group, ctx)


@register("lasso")
def lasso(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """LASSO channel selection (He et al. 2017) on the consumers' sampled inputs, from the exact
    positive-LASSO path (LARS): the penalty below which the channel stays selected, so the
    top-k are the LASSO support with exactly k channels. Needs ``loader=``."""
    from prunekit.criteria.reconstruction import lasso_scores

    return lasso_scores(model, group, ctx)


@register("cap")
def cap(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """Compensation-aware greedy removal order (CaP): each step removes the channel that raises
    the consumers' least-squares-compensated reconstruction loss least, given those already
    removed; the score is the total loss once the channel is removed (lowest = removed first).
    Needs ``loader=``."""
    from prunekit.criteria.reconstruction import cap_scores

    return cap_scores(model, group, ctx)


@register("functionality")
def functionality(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """Activation-clustering proxy after Qin et al. 2018 (functionality-oriented pruning):
    channels whose activation maps duplicate another's (cosine clustering) go first, keeping
    one per cluster. Not the paper's method, whose similarity measure is not public (see
    :mod:`prunekit.criteria.functionality`). Needs ``loader=``."""
    from prunekit.criteria.functionality import functionality_scores

    return functionality_scores(model, group, ctx)


@register("snip")
def snip(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """SNIP connection sensitivity (Lee et al. 2019), channel-level: ``|w * dL/dw|`` summed over
    every weight the channel owns (gradient over the calibration batches). Needs ``loader=``."""
    from prunekit.criteria.init import init_scores

    return init_scores("snip", model, group, ctx)


@register("grasp")
def grasp(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """GraSP (Wang et al. 2020), channel-level: ``sum(w * Hg)`` over the channel's weights
    (higher = keep: GraSP removes the largest ``-w * Hg``). Needs ``loader=``."""
    from prunekit.criteria.init import init_scores

    return init_scores("grasp", model, group, ctx)


@register("synflow")
def synflow(model: nn.Module, group: ChannelGroup, **ctx: Any) -> np.ndarray:
    """SynFlow (Tanaka et al. 2020), channel-level and one round: ``|w * dR/dw|`` of the
    absolute-valued model on an all-ones input, summed over the channel's weights. Data-free:
    only the shape of the first ``loader`` batch is used."""
    from prunekit.criteria.init import init_scores

    return init_scores("synflow", model, group, ctx)


DATA_CRITERIA = frozenset({"taylor", "taylor_act", "activation", "apoz", "lasso", "cap", "functionality",
                           "snip", "grasp", "synflow"})
"""Criteria that need calibration data (``loader=``)."""


@register("random")
def random_scores(model: nn.Module, group: ChannelGroup, *, seed: int = 0, **ctx: Any) -> np.ndarray:
    """Uniform random scores (a baseline), reproducible from ``seed`` and the group index."""
    return np.random.default_rng(seed * 100_003 + group.index).random(group.size)


def score_groups(model: nn.Module, groups: list[ChannelGroup], criterion: str | Criterion, *,
                 fallbacks: dict[str, str] | None = None, **ctx: Any) -> list[np.ndarray]:
    """Scores for every group with the given criterion (name or callable): a list of float
    arrays, one per group. ``ctx`` reaches the criterion (e.g. ``loader``, ``batches``,
    ``seed``), plus ``groups`` (all groups being scored), ``_cache`` (a dict shared by this
    call, so a data-driven criterion can gather statistics for all groups in one pass) and
    ``_fallbacks``. ``fallbacks``, when given, receives group name -> message for every group
    the criterion scored otherwise than its name says (see :func:`report_fallback`)."""
    fn = get(criterion) if isinstance(criterion, str) else criterion
    ctx = {"groups": groups, "_cache": {}, **ctx, "_fallbacks": {} if fallbacks is None else fallbacks}
    out = []
    with torch.no_grad():
        for g in groups:
            s = np.asarray(fn(model, g, **ctx), dtype=np.float64)
            if s.shape != (g.size,):
                raise ValueError(f"criterion returned shape {s.shape} for group '{g.name}' of {g.size} channels")
            out.append(s)
    return out


from prunekit.criteria.conformance import BLIND_TO_DEAD_CHANNELS, check_criterion  # noqa: E402
