"""Criteria that look at what the *next* layers lose: LASSO selection and compensation-aware scores.

Both read the inputs of the group's consumers (the ungrouped conv/linear layers whose input
channels are the group's channels) on calibration batches, as rows of receptive fields.

* ``lasso`` (He, Zhang & Sun 2017): each consumer's output is a sum of per-channel
  contributions ``Y = sum_c Z_c`` with ``Z_c = X_c W_c^T``. Channel weights ``beta`` are found
  by LASSO, ``min ||Y - sum_c beta_c Z_c||^2 + alpha ||beta||_1`` (all consumers of a coupled
  group stacked into one problem); raising ``alpha`` drops channels one after another, so a
  channel's score is the largest ``alpha`` at which it is still selected: keeping the top-k
  is exactly "raise the penalty until k channels remain".
* ``cap`` (compensation-aware, after CaP): the loss of removing channel ``c`` *after* the
  consumer's other weights are re-solved by least squares, in closed form:
  ``tr(W_c [P_cc]^{-1} W_c^T)`` with ``P`` the inverse of the inputs' second-moment matrix
  (the Optimal-Brain-Surgeon formula for a block of inputs), summed over consumers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.criteria.data import (
    DEFAULT_BATCHES,
    _all_groups,
    _cached,
    _weight_members,
    calibration_batches,
)
from prunekit.features import (
    Batch,
    Moments,
    call_on_device,
    reconstructable,
    unfold_rows,
)
from prunekit.graph.dependency import ChannelGroup
from prunekit.runtime import model_mode

MAX_ROWS = 4096  # sampled receptive fields per consumer layer
LASSO_ENTRIES = 40_000  # rows x outputs of one group's stacked LASSO problem


def _consumers(model: nn.Module, group: ChannelGroup) -> list[tuple[str, nn.Module, np.ndarray]]:
    return [site for site in _weight_members(model, group, "in") if reconstructable(site[1])]


def consumer_rows(model: nn.Module, groups: list[ChannelGroup], batches: Iterable[Batch], *,
                  max_rows: int = MAX_ROWS, seed: int = 0) -> dict[str, Tensor]:
    """Sampled input rows (``unfold_rows``) of every consumer layer of ``groups``, at most
    ``max_rows`` per layer spread evenly over the batches; float64 on CPU."""
    layers = {name: mod for g in groups for name, mod, _ in _consumers(model, g)}
    batches = list(batches)
    per_batch = max(1, max_rows // max(1, len(batches)))
    rows: dict[str, list[Tensor]] = {n: [] for n in layers}
    gen = torch.Generator().manual_seed(seed)
    current: dict[str, Tensor] = {}
    handles = [mod.register_forward_pre_hook(lambda m, a, n=n: current.__setitem__(n, a[0].detach()))
               for n, mod in layers.items()]
    try:
        with torch.no_grad(), model_mode(model, "eval"):
            for x, _ in batches:
                current.clear()
                call_on_device(model, x)
                for n, mod in layers.items():
                    if n not in current:
                        continue
                    r = unfold_rows(mod, current[n])
                    pick = torch.randperm(len(r), generator=gen)[:per_batch]
                    rows[n].append(r[pick].double().cpu())
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in rows.items() if v}


def _rows(model: nn.Module, group: ChannelGroup, ctx: dict[str, Any], name: str) -> dict[str, Tensor]:
    groups = _all_groups(group, ctx)
    batches = int(ctx.get("batches", DEFAULT_BATCHES))
    return _cached(ctx, "consumer_rows", lambda: consumer_rows(  # type: ignore[arg-type,return-value]
        model, groups, calibration_batches(ctx.get("loader"), batches, name), seed=int(ctx.get("seed", 0))))


def _blocks(mod: nn.Module) -> int:
    """Columns of ``weight.flatten(1)`` per input channel (the kernel's size; 1 for linear):
    an unfolding layer's rows are channel-major."""
    return int(np.prod(mod.weight.shape[2:]))


def lasso_scores(model: nn.Module, group: ChannelGroup, ctx: dict[str, Any]) -> np.ndarray:
    """LASSO entry penalty of each channel of ``group`` (see the module docstring)."""
    from sklearn.linear_model import lasso_path

    rows = _rows(model, group, ctx, "lasso")
    cols, target = [], []
    consumers = _consumers(model, group)
    gen = torch.Generator().manual_seed(int(ctx.get("seed", 0)))
    for name, mod, chan in consumers:
        x = rows.get(name)
        if x is None:
            continue
        # Keep the stacked problem small (LASSO_ENTRIES rows x outputs over the whole group).
        keep = max(32, LASSO_ENTRIES // max(1, mod.weight.shape[0] * len(consumers)))
        if len(x) > keep:
            x = x[torch.randperm(len(x), generator=gen)[:keep]]
        k = _blocks(mod)
        w = mod.weight.detach().double().cpu().flatten(1)  # (out, C*k)
        z = torch.einsum("rck,ock->cro", x.view(len(x), -1, k), w.view(len(w), -1, k))  # per input channel
        block = torch.zeros(group.size, z.shape[1] * z.shape[2], dtype=torch.float64)
        ok = chan >= 0
        block.index_add_(0, torch.as_tensor(chan[ok]), z[torch.as_tensor(ok)].flatten(1))
        cols.append(block)
        target.append(block.sum(0))
    if not cols:
        from prunekit.criteria import l2

        return l2(model, group)
    design = torch.cat(cols, 1).T.numpy()  # (rows * outputs, channels)
    y = torch.cat(target).numpy()
    scale = np.abs(y).max() or 1.0
    alphas, coefs, _ = lasso_path(design / scale, y / scale, alphas=int(ctx.get("n_alphas", 60)),
                                  positive=True, eps=1e-4, max_iter=2000)
    active = coefs > 1e-12  # (channels, alphas), alphas decreasing
    first = np.where(active.any(1), active.argmax(1), len(alphas))
    # Earlier entry (larger alpha) = more important; ties broken by the final coefficient.
    return (len(alphas) - first).astype(np.float64) + coefs[:, -1] / (coefs[:, -1].max() + 1e-12) * 0.5


def cap_scores(model: nn.Module, group: ChannelGroup, ctx: dict[str, Any]) -> np.ndarray:
    """Loss of removing each channel after least-squares compensation (see the module docstring)."""
    rows = _rows(model, group, ctx, "cap")
    scores = np.zeros(group.size)
    used = False
    for name, mod, chan in _consumers(model, group):
        x = rows.get(name)
        if x is None:
            continue
        k = _blocks(mod)
        mom = Moments.empty(x.shape[1], None)
        mom.add(x)
        m = mom.xx / mom.count
        m = m + 1e-6 * torch.diagonal(m).mean() * torch.eye(len(m), dtype=m.dtype)
        p = torch.linalg.inv(m)
        w = mod.weight.detach().double().cpu().flatten(1)
        n_in = w.shape[1] // k
        idx = torch.arange(n_in * k).view(n_in, k)
        p_blocks = p[idx[:, :, None], idx[:, None, :]]  # (C, k, k)
        w_blocks = w.view(len(w), n_in, k).transpose(0, 1)  # (C, out, k)
        loss = torch.einsum("cok,ckl,col->c", w_blocks, torch.linalg.inv(p_blocks), w_blocks).numpy()
        ok = chan >= 0
        np.add.at(scores, chan[ok], loss[ok])
        used = True
    if not used:
        from prunekit.criteria import l2

        return l2(model, group)
    return scores
