"""Least-squares reconstruction of the layers that lost input channels.

After channels are removed, a consumer layer ``y = W x + b`` sees fewer inputs. The weights
that best reproduce the original output from what is left solve a linear least-squares
problem over sampled input patches (He et al. 2017; the closed-form "compensation" of CaP
is the same problem solved from the original network's input statistics):

    min_{W', b'}  E || y_orig - W' x_kept - b' ||^2
    => [W' b'] = E[y x~^T] E[x~ x~^T]^{-1},   x~ = [x_kept; 1].

``mode="sequential"`` walks the layers in execution order and takes ``x`` from the *pruned*
model (with the earlier layers already reconstructed) and ``y`` from the *original* one, so
errors do not accumulate; ``mode="oneshot"`` takes both from the original model in a single
pass (it only needs the input second moments, since ``y = W x + b`` there).

A layer without a bias gets its new offset folded into the BatchNorm that reads its output
(``running_mean -= b'``); with neither, the offset is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.features import (
    Batch,
    Capture,
    Moments,
    call_on_device,
    call_with_hooks,
    paired_moments,
    reconstructable,
    unfold_rows,
)
from prunekit.handlers import handler_for
from prunekit.plan import PruningPlan
from prunekit.runtime import model_mode

log = logging.getLogger(__name__)

__all__ = ["pair_moments", "reconstruct", "solve_least_squares"]


def solve_least_squares(xx: Tensor, xy: Tensor, *, intercept: bool = True, ridge: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Solve ``min || y - W x - b ||^2`` from the sums of :class:`Moments` (last row/col is the
    constant). Returns ``(W, b)`` with ``W`` of shape ``(out, in)`` (``b`` is zero without
    ``intercept``). A small ridge, relative to the mean input energy, keeps it well posed."""
    if not intercept:
        xx, xy = xx[:-1, :-1], xy[:-1]
    n = xx.shape[0]
    lam = ridge * float(torch.diagonal(xx).mean().clamp_min(1e-12))
    sol = torch.linalg.solve(xx + lam * torch.eye(n, dtype=xx.dtype), xy)  # (in[+1], out)
    if intercept:
        return sol[:-1].T.contiguous(), sol[-1].contiguous()
    return sol.T.contiguous(), torch.zeros(xy.shape[1], dtype=xx.dtype)


def _feature_index(layer: nn.Module, keep_in: list[int] | None, n_in: int) -> Tensor:
    """Columns of the original layer's unfolded input that the pruned layer still reads
    (rows of an unfolding layer are channel-major: kernel-size columns per channel)."""
    per = int(np.prod(layer.weight.shape[2:]))
    chans = torch.arange(n_in) if keep_in is None else torch.as_tensor(keep_in)
    return (chans[:, None] * per + torch.arange(per)[None, :]).reshape(-1)


def _kept(plan: PruningPlan, name: str, dim: int) -> list[int] | None:
    return plan.keep.get(f"{name}.weight", {}).get(dim)


def _following_bn(model: nn.Module, layer_names: list[str], batch: Batch) -> tuple[dict[str, nn.Module], set[str]]:
    """For each layer, the normalisation with running statistics (batch norm, tracking
    instance norm; by its handler) whose input is exactly that layer's output; and the layers
    whose forward ran (``nn.MultiheadAttention`` uses its ``out_proj``'s weight without
    calling it: such a layer has no input to fit to)."""
    out_ids: dict[int, str] = {}
    found: dict[str, nn.Module] = {}
    handles = []
    mods = dict(model.named_modules())
    ran: set[str] = set()

    def seen(name: str, out: Any) -> None:
        out_ids[id(out)] = name
        ran.add(name)

    for name in layer_names:
        handles.append(mods[name].register_forward_hook(lambda m, a, o, name=name: seen(name, o)))

    def note(bn: nn.Module, args: tuple[Any, ...]) -> None:
        if id(args[0]) in out_ids:
            found.setdefault(out_ids[id(args[0])], bn)

    for m in mods.values():
        handler = handler_for(m)
        if handler is not None and handler.is_norm and hasattr(m, "running_mean"):
            handles.append(m.register_forward_pre_hook(note))
    call_with_hooks(model, batch[0], handles)
    return found, ran


def _sample(rows: int, positions: int | None, gen: torch.Generator, per_sample: int) -> Tensor | None:
    """Row indices: ``positions`` random positions from each sample's ``per_sample`` rows."""
    if positions is None or positions >= per_sample:
        return None
    n = rows // per_sample
    idx = torch.stack([torch.randperm(per_sample, generator=gen)[:positions] for _ in range(n)])
    return (idx + torch.arange(n)[:, None] * per_sample).reshape(-1)


def reconstruct(pruned: nn.Module, original: nn.Module, plan: PruningPlan, batches: Iterable[Batch], *,
                layers: list[str] | None = None, mode: str = "sequential", positions: int | None = 16,
                seed: int = 0) -> list[str]:
    """Rewrite, in place, the weights of ``pruned``'s layers that lost input channels so that
    they reproduce ``original``'s outputs on the calibration ``batches`` (a re-iterable list of
    ``(inputs, targets)``). ``layers`` limits which layers (default: every ungrouped conv /
    linear whose inputs were pruned; a layer whose forward never runs, such as an attention's
    ``out_proj``, is left alone); ``positions`` random output positions per sample are
    used (None: all). Returns the names of the rewritten layers, in order."""
    if mode not in ("sequential", "oneshot"):
        raise ValueError(f"mode={mode!r}: 'sequential' or 'oneshot'")
    batches = list(batches)
    if not batches:
        raise ValueError("reconstruct needs at least one calibration batch")
    pmods, omods = dict(pruned.named_modules()), dict(original.named_modules())
    names = layers if layers is not None else [
        n for n, m in pmods.items() if n in omods and reconstructable(m) and _kept(plan, n, 1) is not None]
    names = [n for n in names if reconstructable(pmods[n]) and reconstructable(omods.get(n, nn.Identity()))]
    if not names:
        return []
    with model_mode(pruned, "eval"), model_mode(original, "eval"):
        bns, ran = _following_bn(pruned, names, batches[0])  # in eval too: a training forward would update BN statistics
        names = [n for n in names if n in ran]
        if not names:
            return []
        if mode == "oneshot":
            _reconstruct_oneshot(pruned, original, plan, batches, names, bns, positions, seed)
        else:
            for name in names:
                _reconstruct_layer(pruned, original, plan, batches, name, bns.get(name), positions, seed)
    return names


def _write(layer: nn.Module, bn: nn.Module | None, w: Tensor, b: Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape).to(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(b.to(layer.bias))
        elif bn is not None and bn.running_mean is not None:
            bn.running_mean.sub_(b.to(bn.running_mean))


def pair_moments(pruned: nn.Module, original: nn.Module, plan: PruningPlan, batches: list[Batch], names: list[str],
                 positions: int | None = 16, seed: int = 0) -> list[Moments]:
    """Least-squares sums of each layer in ``names``: its input in ``pruned`` against the same
    layer's output in ``original``, restricted to the output channels ``plan`` keeps, over
    ``positions`` random output positions per sample (None: all) of every batch (each model
    is called once per batch for all the layers). Returns one :class:`Moments` per name."""

    def selector(name: str) -> Any:
        keep_out = _kept(plan, name, 0)
        gen = torch.Generator().manual_seed(seed)

        def select(xr: Tensor, yr: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
            if keep_out is not None:
                yr = yr[:, keep_out]
            pick = _sample(len(xr), positions, gen, len(xr) // inputs.shape[0])
            return (xr[pick], yr[pick]) if pick is not None else (xr, yr)
        return select

    return paired_moments(pruned, [pruned.get_submodule(n) for n in names], original,
                          [original.get_submodule(n) for n in names], batches, [selector(n) for n in names])


def _reconstruct_layer(pruned: nn.Module, original: nn.Module, plan: PruningPlan, batches: list[Batch],
                       name: str, bn: nn.Module | None, positions: int | None, seed: int) -> None:
    player = pruned.get_submodule(name)
    (mom,) = pair_moments(pruned, original, plan, batches, [name], positions, seed)
    assert mom.xy is not None
    w, b = solve_least_squares(mom.xx, mom.xy, intercept=player.bias is not None or bn is not None)
    _write(player, bn, w, b)


def _reconstruct_oneshot(pruned: nn.Module, original: nn.Module, plan: PruningPlan, batches: list[Batch],
                         names: list[str], bns: dict[str, nn.Module], positions: int | None, seed: int) -> None:
    """CaP-style compensation: one pass over the original model for E[x~ x~^T] of every layer;
    the targets are ``W x + b`` of the original layer, so ``E[x~ y^T] = E[x~ x~^T] [W b]^T``."""
    caps = {n: Capture(original.get_submodule(n), "in") for n in names}
    moms: dict[str, Moments] = {}
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for x, _ in batches:
                call_on_device(original, x)
                for n, cap in caps.items():
                    assert cap.value is not None
                    xr = unfold_rows(original.get_submodule(n), cap.value)
                    pick = _sample(len(xr), positions, gen, len(xr) // cap.value.shape[0])
                    moms.setdefault(n, Moments.empty(xr.shape[1], None)).add(xr if pick is None else xr[pick])
    finally:
        for cap in caps.values():
            cap.close()
    for n in names:
        olayer, player = original.get_submodule(n), pruned.get_submodule(n)
        keep_out = _kept(plan, n, 0)
        w_full = olayer.weight.detach().double().cpu().flatten(1)
        b_full = olayer.bias.detach().double().cpu() if olayer.bias is not None else torch.zeros(len(w_full), dtype=torch.float64)
        if keep_out is not None:
            w_full, b_full = w_full[keep_out], b_full[keep_out]
        cols = _feature_index(olayer, _kept(plan, n, 1), w_full.shape[1])
        sel = torch.cat([cols, torch.tensor([moms[n].xx.shape[0] - 1])])
        xx = moms[n].xx[sel]  # rows: kept inputs + constant; columns: all inputs + constant
        xy = xx[:, :-1] @ w_full.T + xx[:, -1:] @ b_full[None, :]
        w, b = solve_least_squares(xx[:, sel], xy, intercept=player.bias is not None or n in bns)
        _write(player, bns.get(n), w, b)
