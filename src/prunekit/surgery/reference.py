"""The exactness oracle: the original model with removed channels silenced at consumers.

For networks without channel-mixing normalisation, a pruned model must compute the same
function as the original whose removed channels' *incoming* weights are zeroed at every
consumer (conv/linear input slices). Tests and the coverage benchmark compare against it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunekit.graph import DependencyGraph
from prunekit.plan import PruningPlan
from prunekit.surgery import get_tensor


def masked_reference(model: nn.Module, graph: DependencyGraph, plan: PruningPlan,
                     roles: tuple[str, ...] = ("in",)) -> nn.Module:
    """Copy of ``model`` where every consumer's weights reading a removed channel are zero;
    with ``roles=("in", "out")`` also the producers' rows and biases making one, so the
    removed channels carry exact zeros everywhere."""
    ref = copy.deepcopy(model)
    member_roles = {(m.tensor, m.dim): m.role for m in graph.members}
    with torch.no_grad():
        for name, dims in plan.keep.items():
            t = get_tensor(ref, name)
            for dim, kept in dims.items():
                if member_roles.get((name, dim)) not in roles:
                    continue
                mask = torch.ones(t.shape[dim], dtype=torch.bool)
                mask[torch.as_tensor(kept, dtype=torch.long)] = False
                t.index_fill_(dim, torch.nonzero(mask).flatten(), 0.0)
    return ref
