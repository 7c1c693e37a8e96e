"""Ops whose channel flow depends on index *values* are traced with real tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.graph.tracer import NeedsRealTensors, Tracer
from prunekit.surgery.reference import masked_reference


class TokenBias(nn.Module):
    """A bias table looked up by position through an index buffer (relative-position
    style, as in Swin and MaxViT): the table's channel dim follows ``fc1``'s outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.table = nn.Parameter(torch.randn(5, 8))
        self.register_buffer("index", torch.tensor([3, 1, 4, 0, 2, 4]))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) + self.table[self.index]))


def test_meta_trace_refuses_index_values_it_does_not_have() -> None:
    # Indexing a CPU label with a meta index returns uninitialised memory instead of failing,
    # so the rule must stop the meta trace itself rather than record garbage atoms.
    model = TokenBias().eval()
    with pytest.raises(NeedsRealTensors, match="getitem"):
        Tracer(model).run(torch.randn(2, 6, 4), "eval", meta=True)


def test_index_buffer_lookup_is_traced_with_real_values_and_pruned_exactly() -> None:
    torch.manual_seed(0)
    model = TokenBias().eval()
    x = torch.randn(2, 6, 4)
    graph = pk.trace(model, x)
    assert graph.state.meta is False  # the meta device has no index values to follow
    assert any(m.tensor == "table" and m.dim == 1 for g in graph.groups for m in g.members)
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert small.fc1.out_features == 4 and tuple(small.table.shape) == (5, 4) and not plan.meta["repairs"]
    ref = masked_reference(model, graph, plan)
    with torch.no_grad():
        assert torch.allclose(small(x), ref(x), atol=1e-5)
