"""Criteria that look at what the *next* layers lose: LASSO selection and compensation-aware scores.

Both read the inputs of the group's consumers (the ungrouped conv/linear layers whose input
channels are the group's channels) on calibration batches, as rows of receptive fields.

* ``lasso`` (He, Zhang & Sun 2017): each consumer's output is a sum of per-channel
  contributions ``Y = sum_c Z_c`` with ``Z_c = X_c W_c^T``. Channel weights ``beta >= 0``
  (they scale channels) solve the LASSO ``min ||Y - sum_c beta_c Z_c||^2 / (2N) + alpha
  ||beta||_1`` (all consumers of a coupled group stacked into one problem). The whole path
  over ``alpha`` is computed exactly by LARS; a channel's score is the penalty below which it
  stays selected (see :func:`lasso_order`), so when the path drops no channel, the top-k
  channels are the LASSO support with exactly k channels (the one the authors reach by
  bisecting ``alpha``) for every k.
* ``cap`` (compensation-aware, after CaP): greedy joint selection. The loss of removing a
  set ``S`` of input columns *after* the consumer's other weights (and offset) are re-solved
  by least squares is, in closed form, ``tr(W_S [P_SS]^{-1} W_S^T)`` with ``P`` the inverse of
  the inputs' second-moment matrix (the Optimal-Brain-Surgeon formula for a block of inputs),
  summed over the group's consumers. Each step removes the channel whose removal, given the
  ones already removed, raises that loss least; the compensated weights and ``P`` are updated
  by a Schur complement after each step (no refit from scratch). A channel's score is the
  total loss once it is removed: increasing along the removal order, so the ``k`` lowest
  scores are the greedy set of ``k`` for every ``k``, and two copies of a unit are not both
  removed while the other copy is what compensates for the first.
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


def consumer_layers(model: nn.Module, group: ChannelGroup) -> list[tuple[str, nn.Module, np.ndarray]]:
    """(name, module, channel map) of the layers a least-squares fit can rewrite (ungrouped
    conv / linear) whose input channels are the group's."""
    return [site for site in _weight_members(model, group, "in") if reconstructable(site[1])]


def consumer_rows(model: nn.Module, groups: list[ChannelGroup], batches: Iterable[Batch], *,
                  max_rows: int = MAX_ROWS, seed: int = 0) -> dict[str, Tensor]:
    """Sampled input rows (``unfold_rows``) of every consumer layer of ``groups``, at most
    ``max_rows`` per layer spread evenly over the batches; float64 on CPU."""
    layers = {name: mod for g in groups for name, mod, _ in consumer_layers(model, g)}
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
    """Exact LASSO selection order of the channels of ``group`` (see the module docstring and
    :func:`lasso_order`)."""
    rows = _rows(model, group, ctx, "lasso")
    cols, target = [], []
    consumers = consumer_layers(model, group)
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
    return lasso_order(design / scale, y / scale)


def lasso_order(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Scores from the exact positive-LASSO path of ``y ~ design @ beta`` (``beta >= 0``, no
    intercept), computed by LARS (``sklearn.linear_model.lars_path(method="lasso")``) at its
    exact breakpoints.

    A channel selected down to the end of the path scores ``lambda / lambda_max`` in
    ``(0, 1]``, ``lambda`` being the penalty of its *last* entry (the top of the run of
    penalties, reaching zero, over which it stays selected). A channel the path drops and does
    not take back scores ``lambda_top / lambda_max - 1`` in ``(-1, 0)`` (``lambda_top``: the top
    of its last run of selection), one never selected ``-1``. Without drops the supports are
    nested and the top-``k`` scores are the LASSO support with exactly ``k`` channels, for every
    ``k`` the path passes through; channels entering at the same penalty (exact ties) tie."""
    from sklearn.linear_model import lars_path

    alphas, _, coefs = lars_path(design, y, method="lasso", positive=True)
    return _path_scores(alphas, coefs)


def lasso_order_gram(gram: np.ndarray, xy: np.ndarray, n_samples: int) -> np.ndarray:
    """:func:`lasso_order` from the sufficient statistics ``gram = design^T design`` and
    ``xy = design^T y`` of ``n_samples`` rows (``sklearn.linear_model.lars_path_gram``): the
    same path without holding the rows, so every sampled row can be used."""
    from sklearn.linear_model import lars_path_gram

    alphas, _, coefs = lars_path_gram(xy, gram, n_samples=n_samples, method="lasso", positive=True)
    return _path_scores(alphas, coefs)


def _path_scores(alphas: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """The scores of :func:`lasso_order` from a LARS path (penalties decreasing, coefficients
    per channel and breakpoint)."""
    n = coefs.shape[0]
    lam_max = float(alphas[0]) if len(alphas) and alphas[0] > 0 else 1.0
    # The path is linear between breakpoints: the support on (alphas[i+1], alphas[i]) is that
    # of the midpoint, which also counts a coefficient shrinking to zero at alphas[i+1].
    mids = (coefs[:, :-1] + coefs[:, 1:]) / 2 > 0  # (channels, intervals), penalty decreasing
    tops = alphas[:-1]
    scores = np.full(n, -1.0)
    for c in range(n):
        on = np.flatnonzero(mids[c])
        if len(on) == 0:
            continue
        # Walk back from the last selected interval to the start of that run.
        start = on[-1]
        while start > 0 and mids[c, start - 1]:
            start -= 1
        top = float(tops[start]) / lam_max
        scores[c] = top if on[-1] == mids.shape[1] - 1 else top - 1.0
    return scores


def lasso_scores_towards(consumers: list[tuple[Tensor, Tensor | None, Moments, np.ndarray]], size: int) -> np.ndarray:
    """:func:`lasso_order` scores of a group's ``size`` channels when the consumers' inputs and
    the targets come from different networks (He et al.'s layer-by-layer selection: inputs
    from the partially pruned network, targets the original network's outputs).

    ``consumers`` holds, per consumer layer, its weight ``W`` as ``(outputs, inputs * k)``
    (channel-major, ``k`` columns per input), its bias (or None), the :class:`Moments` of its
    unfolded inputs against the target outputs, and the group channel of each input (-1: not
    the group's). Channel ``c``'s contribution is ``Z_c = X_c W_c^T``; the LASSO fits
    ``Y - b - sum_{d not in group} Z_d`` with ``sum_c beta_c Z_c``, every consumer's rows
    stacked, from the sums alone: ``Z_c . Z_d = tr(W_c XX_cd W_d^T)``,
    ``Z_c . (Y - b) = tr(W_c (XY_c - x_c b^T))``."""
    gram = np.zeros((size, size))
    xy = np.zeros(size)
    rows = 0
    for w, bias, mom, chan in consumers:
        assert mom.xy is not None
        k = w.shape[1] // len(chan)
        wb = w.double().reshape(len(w), len(chan), k)
        xx = mom.xx[:-1, :-1].reshape(len(chan), k, len(chan), k)
        target = mom.xy[:-1] if bias is None else mom.xy[:-1] - mom.xx[:-1, -1:] * bias.double()[None, :]
        g_pos = torch.einsum("oak,akbl,obl->ab", wb, xx, wb).numpy()  # per input position
        b_pos = torch.einsum("oak,ako->a", wb, target.reshape(len(chan), k, -1)).numpy()
        inside = chan >= 0
        b_pos = b_pos - g_pos[:, ~inside].sum(1)  # inputs of other groups are part of the target
        idx = chan[inside]
        np.add.at(gram, (idx[:, None], idx[None, :]), g_pos[np.ix_(inside, inside)])
        np.add.at(xy, idx, b_pos[inside])
        rows += mom.count * len(w)
    scale = np.abs(np.diag(gram)).max() or 1.0
    return lasso_order_gram(gram / scale, xy / scale, max(1, rows))


def _channel_columns(chan: np.ndarray, k: int) -> dict[int, Tensor]:
    """Columns of a consumer's ``weight.flatten(1)`` fed by each group channel (``k`` per input
    channel it feeds; usually one input channel)."""
    cols: dict[int, list[int]] = {}
    for i, c in enumerate(chan.tolist()):
        if c >= 0:
            cols.setdefault(c, []).extend(range(i * k, (i + 1) * k))
    return {c: torch.tensor(v) for c, v in cols.items()}


class _Compensated:
    """One consumer's compensated least-squares problem while columns are removed.

    With ``M`` the second moment of ``[x; 1]`` and ``P = M^{-1}`` (restricted to the weight
    columns), removing the column set ``S`` and re-solving the rest (bias included) costs
    ``tr(W_S (P_SS)^{-1} W_S^T)`` per row (the OBS block formula). Removing ``S`` then ``T``
    costs the same in two steps: after ``S`` the compensated weights are
    ``W - W_S (P_SS)^{-1} P_S:`` and the inverse moments of the kept columns are the Schur
    complement ``P - P_:S (P_SS)^{-1} P_S:``, and ``T``'s increment is the same formula on them."""

    def __init__(self, x: Tensor, w: Tensor, cols: dict[int, Tensor]) -> None:
        mom = Moments.empty(x.shape[1], None)
        mom.add(x)
        m = mom.xx / mom.count
        # A small ridge keeps P finite when columns are collinear (e.g. duplicated channels).
        m = m + 1e-6 * torch.diagonal(m).mean() * torch.eye(len(m), dtype=m.dtype)
        self.p = torch.linalg.inv(m)[:-1, :-1]  # the constant's row is never needed again
        self.w = w
        self.cols = cols
        # Channels with equally many columns are scored in one batched solve.
        self.batches: dict[int, list[int]] = {}
        for c, idx in cols.items():
            self.batches.setdefault(len(idx), []).append(c)

    def increments(self, candidates: np.ndarray, out: np.ndarray) -> None:
        """Add to ``out[c]`` the loss increase of removing channel ``c`` next, for each candidate."""
        for chans in self.batches.values():
            chans = [c for c in chans if candidates[c]]
            if not chans:
                continue
            idx = torch.stack([self.cols[c] for c in chans])  # (b, s)
            p_blocks = self.p[idx[:, :, None], idx[:, None, :]]  # (b, s, s)
            w_blocks = self.w[:, idx].transpose(0, 1)  # (b, out, s)
            loss = torch.einsum("bos,bst,bot->b", w_blocks, torch.linalg.inv(p_blocks), w_blocks)
            np.add.at(out, np.array(chans), loss.numpy())

    def remove(self, c: int) -> None:
        """Remove channel ``c``'s columns: compensate the weights, Schur-complement ``P``."""
        idx = self.cols.get(c)
        if idx is None:
            return
        solve = torch.linalg.solve(self.p[idx][:, idx], self.p[idx])  # (P_SS)^{-1} P_S:
        self.w = self.w - self.w[:, idx] @ solve
        self.p = self.p - self.p[:, idx] @ solve


def cap_scores(model: nn.Module, group: ChannelGroup, ctx: dict[str, Any]) -> np.ndarray:
    """Greedy compensation-aware removal order (see the module docstring): each step removes the
    prunable channel whose removal, after the ones already removed, raises the consumers'
    compensated loss least; a channel's score is the total loss once it is removed, so the
    ``k`` lowest scores are the greedy choice of ``k`` for every ``k``."""
    rows = _rows(model, group, ctx, "cap")
    problems = []
    for name, mod, chan in consumer_layers(model, group):
        x = rows.get(name)
        if x is None:
            continue
        w = mod.weight.detach().double().cpu().flatten(1)
        problems.append(_Compensated(x, w, _channel_columns(chan, _blocks(mod))))
    if not problems:
        from prunekit.criteria import l2

        return l2(model, group)
    return _greedy_removal(problems, np.asarray(group.prunable, dtype=bool))


def _greedy_removal(problems: list[_Compensated], prunable: np.ndarray) -> np.ndarray:
    """Scores of the greedy removal order over ``prunable`` channels: the summed compensated
    loss of all channels removed so far, at the step a channel goes (strictly increasing along
    the order); channels that are not prunable score above every prunable one."""
    candidates = prunable.copy()
    scores = np.zeros(len(prunable))
    total = 0.0
    while candidates.any():
        inc = np.zeros(len(prunable))
        for prob in problems:
            prob.increments(candidates, inc)
        inc[~candidates] = np.inf
        c = int(np.argmin(inc))
        # Increments are >= 0 in exact arithmetic; clipping keeps rounding from reordering, and
        # nextafter breaks exact ties so that a stable sort of the scores follows the greedy order.
        total = max(total + max(float(inc[c]), 0.0), np.nextafter(total, np.inf))
        scores[c] = total
        candidates[c] = False
        for prob in problems:
            prob.remove(c)
    scores[~prunable] = np.nextafter(total, np.inf)
    return scores
