"""Activation-clustering proxy after Qin et al. 2018: remove *redundant* filters, not weak ones.

Qin et al. (functionality-oriented filter pruning) group filters by their interpreted
function and prune the repeated ones; their similarity measure and clustering are not
public, so this is a proxy, not their method. Each channel's function is described by its
activation maps on calibration data (at its activation output, see
:mod:`prunekit.criteria.data`), flattened and normalised to unit length. Channels are clustered agglomeratively by cosine distance (average linkage); every
merge of two clusters keeps the member with the larger activation energy as the cluster's
representative and marks the other as redundant. The order in which channels are marked is
the ranking: removing the ``n`` first-marked channels leaves exactly one representative
per cluster of an ``size - n``-cluster clustering, whatever ``n`` the budget asks for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage

from prunekit.criteria.data import (DEFAULT_BATCHES, _all_groups, _cached, calibration_batches, report_site_fallback,
                                    site_views, unobserved_fallback)
from prunekit.graph.dependency import ChannelGroup
from torch import nn

MAX_FEATURES = 4096  # feature-map values kept per channel and site


def channel_features(model: nn.Module, groups: list[ChannelGroup], batches: Any, *,
                     max_features: int = MAX_FEATURES, seed: int = 0,
                     fallbacks: dict[int, str] | None = None) -> dict[int, np.ndarray]:
    """Per group index, a ``(channels, features)`` matrix of sampled activation values: the
    same sampled (sample, position) entries for every channel, concatenated over batches and
    observation sites. ``fallbacks`` receives the groups read elsewhere than at their
    activation output (see :func:`prunekit.criteria.data.site_views`)."""
    parts: dict[int, list[np.ndarray]] = {g.index: [] for g in groups}
    sizes = {g.index: g.size for g in groups}
    gen = torch.Generator().manual_seed(seed)
    for gi, chan, view in site_views(model, groups, batches, fallbacks=fallbacks):
        flat = view.transpose(0, 1).reshape(view.shape[1], -1)  # (channels, samples * positions)
        pick = torch.randperm(flat.shape[1], generator=gen)[:max_features]
        block = np.zeros((sizes[gi], len(pick)))
        ok = chan >= 0
        block[chan[ok]] = flat[:, pick].double().cpu().numpy()[ok]
        parts[gi].append(block)
    return {gi: np.concatenate(p, 1) if p else np.zeros((sizes[gi], 0)) for gi, p in parts.items()}


def redundancy_order(features: np.ndarray) -> np.ndarray:
    """Scores from the agglomerative merge order (higher = keep longer); see the module docstring."""
    energy = np.linalg.norm(features, axis=1)
    live = np.flatnonzero(energy > 1e-12)  # silent channels do nothing: they go first
    score = np.full(len(features), -1.0)
    if len(live) < 2:
        score[live] = 1.0
        return score
    score[live] = _merge_order(features[live], energy[live])
    return score


def _merge_order(features: np.ndarray, energy: np.ndarray) -> np.ndarray:
    n = len(features)
    unit = features / energy[:, None]
    tree = linkage(unit, method="average", metric="cosine")
    rep = list(range(n)) + [0] * (n - 1)  # representative of every cluster id
    score = np.zeros(n)
    for step, (a, b, _, _) in enumerate(tree):
        ra, rb = rep[int(a)], rep[int(b)]
        keep, drop = (ra, rb) if energy[ra] >= energy[rb] else (rb, ra)
        score[drop] = step  # marked earlier = more redundant = lower score
        rep[n + step] = keep
    score[rep[2 * n - 2]] = n  # the last representative stays longest
    return score


def functionality_scores(model: nn.Module, group: ChannelGroup, ctx: dict[str, Any]) -> np.ndarray:
    """Activation-clustering scores of ``group`` (feature maps for all groups gathered in one pass)."""
    groups = _all_groups(group, ctx)
    batches = int(ctx.get("batches", DEFAULT_BATCHES))
    fallbacks = _cached(ctx, "functionality:fallbacks", dict)  # filled by the feature pass below
    feats = _cached(ctx, "functionality", lambda: channel_features(
        model, groups, calibration_batches(ctx.get("loader"), batches, "functionality"),
        seed=int(ctx.get("seed", 0)), fallbacks=fallbacks))
    report_site_fallback("functionality", group, fallbacks, ctx)
    if feats[group.index].shape[1] == 0:
        return unobserved_fallback("functionality", model, group, ctx)
    return redundancy_order(feats[group.index])
