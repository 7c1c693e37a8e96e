"""Pruning-at-initialisation saliencies, summed per coupled channel: SNIP, GraSP, SynFlow.

Each paper scores single weights; a channel's score here is the sum of the scores of every
weight the channel owns (its filters, norm and bias entries, and its consumers' input slices),
so the saliencies rank whole channels as the rest of prunekit does (a channel-level variant:
the papers prune individual connections).

* **SNIP** (Lee et al., ICLR 2019): connection sensitivity ``|w * dL/dw|`` on a batch of data.
  Here the gradient is accumulated over the calibration batches first.
* **GraSP** (Wang et al., ICLR 2020): ``-w * (H g)``, with ``g = dL/dw`` and ``H`` the Hessian of
  the loss; GraSP removes the weights with the *largest* value (removing them reduces gradient
  flow least), so the criterion returns ``sum(w * Hg)`` per channel (higher = keep). ``Hg`` is
  the gradient of ``g.detach() . dL/dw``, by double back-propagation over the calibration
  batches (gradient summed first, as the authors' code does over its samples).
* **SynFlow** (Tanaka et al., NeurIPS 2020): data-free. Every floating-point parameter and
  buffer is replaced by its absolute value, the model is run in eval mode on an all-ones input
  of the data's shape (batch 1) in float64, ``R = sum(output)`` and the score is
  ``|w * dR/dw|``. Only the *shape* of the first calibration batch is used. The model is
  restored afterwards. The paper's iterative re-scoring (100 rounds of prune-and-rescore) is
  not done here: one round, a simplification.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.criteria.data import DEFAULT_BATCHES, _all_groups, _cached, calibration_batches, task_loss
from prunekit.errors import PruningError
from prunekit.features import Batch, call_on_device
from prunekit.graph.dependency import ChannelGroup
from prunekit.runtime import model_mode

__all__ = ["grasp_saliency", "per_channel", "snip_saliency", "synflow_saliency"]


def per_channel(groups: list[ChannelGroup], saliency: dict[str, Tensor]) -> dict[int, np.ndarray]:
    """Sum per-weight ``saliency`` (parameter name -> tensor of its shape) over every
    slice each channel of each group owns; returns group index -> channel scores."""
    out = {}
    for g in groups:
        total = np.zeros(g.size)
        for m in g.members:
            s = saliency.get(m.tensor)
            if s is None:
                continue
            per = s.movedim(m.dim, 0).reshape(s.shape[m.dim], -1).sum(1).double().cpu().numpy()
            ok = m.channel >= 0
            np.add.at(total, m.channel[ok], per[ok])
        out[g.index] = total
    return out


def _summed_grad(model: nn.Module, batches: Iterable[Batch], *, create_graph: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Parameters' loss gradient summed over ``batches`` (with the graph kept when asked),
    and the summed loss."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total: Tensor | None = None
    for x, y in batches:
        loss = task_loss(call_on_device(model, x), y)
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError("no calibration batch")
    grads = torch.autograd.grad(total, list(params.values()), create_graph=create_graph, allow_unused=True)
    return {n: g for n, g in zip(params, grads) if g is not None}, total


def snip_saliency(model: nn.Module, batches: Iterable[Batch]) -> dict[str, Tensor]:
    """``|w * dL/dw|`` per parameter (gradient summed over ``batches``), eval mode."""
    params = dict(model.named_parameters())
    with model_mode(model, "eval"), torch.enable_grad():
        grads, _ = _summed_grad(model, batches)
    return {n: (params[n].detach() * g).abs() for n, g in grads.items()}


def grasp_saliency(model: nn.Module, batches: Iterable[Batch]) -> dict[str, Tensor]:
    """``w * (H g)`` per parameter (higher = keep; GraSP removes the largest ``-w * Hg``)."""
    params = dict(model.named_parameters())
    with model_mode(model, "eval"), torch.enable_grad():
        batches = list(batches)
        grads, _ = _summed_grad(model, batches, create_graph=True)
        names = list(grads)
        dot = sum((grads[n] * grads[n].detach()).sum() for n in names)
        hg = torch.autograd.grad(dot, [params[n] for n in names], allow_unused=True)
    return {n: params[n].detach() * h.detach() for n, h in zip(names, hg) if h is not None}


def _abs_network_output(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[dict[str, Tensor], Tensor]:
    """The parameters of an absolute-valued float64 copy of ``model`` (every floating-point
    parameter and buffer replaced by its magnitude; ``model`` is not changed) and ``R``, the
    sum of its eval-mode output on an all-ones input of ``input_shape`` (batch 1), with the
    graph kept for ``dR/dw``."""
    work = copy.deepcopy(model).double()
    with torch.no_grad():
        for t in list(work.parameters()) + list(work.buffers()):
            if t.is_floating_point():
                t.abs_()
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    x = torch.ones((1, *input_shape[1:]), dtype=torch.float64, device=device)
    with model_mode(work, "eval"), torch.enable_grad():
        out = call_on_device(work, x)
        r = sum(o.sum() for o in (out if isinstance(out, (tuple, list)) else [out]))
    return dict(work.named_parameters()), r


def synflow_saliency(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Tensor]:
    """``|w * dR/dw|`` with ``R`` the summed output of the absolute-valued model (float64,
    eval mode) on an all-ones input of ``input_shape`` (batch 1); ``model`` is not changed
    (a copy is scored)."""
    params, r = _abs_network_output(model, input_shape)
    grads = torch.autograd.grad(r, list(params.values()), allow_unused=True)
    return {n: (p.detach() * g).abs() for (n, p), g in zip(params.items(), grads) if g is not None}


def path_norm(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """``log R``: the logarithm of the l1 path norm of ``model`` (the summed output of its
    absolute-valued copy on an all-ones input of ``input_shape``, batch 1, eval mode), a
    data-free, label-free score of a whole architecture at initialisation (our reading of
    FreeNAS's SynFlow-like "FreeFlow", whose formula our sources do not give). For a network
    without biases and normalisation ``R`` is the sum over input-output paths of the product
    of the weights' magnitudes; SynFlow's per-weight scores sum to (depth x R) there."""
    _, r = _abs_network_output(model, input_shape)
    return float(torch.log(r.detach()))


def init_scores(name: str, model: nn.Module, group: ChannelGroup, ctx: dict[str, Any]) -> np.ndarray:
    """Channel scores of ``name`` ('snip', 'grasp' or 'synflow'), computed once for all groups."""
    groups = _all_groups(group, ctx)
    batches = int(ctx.get("batches", DEFAULT_BATCHES))

    def compute() -> dict[int, np.ndarray]:
        data = calibration_batches(ctx.get("loader"), batches, name)
        if name == "synflow":
            x, _ = next(iter(data))
            if not isinstance(x, Tensor):
                raise PruningError("criterion 'synflow': needs a model with one tensor input (an all-ones image)")
            sal = synflow_saliency(model, tuple(x.shape))
        else:
            sal = (snip_saliency if name == "snip" else grasp_saliency)(model, data)
        return per_channel(groups, sal)

    return _cached(ctx, name, compute)[group.index]
