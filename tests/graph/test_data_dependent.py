"""Models whose shapes follow values (NMS, thresholds, boolean masks): validation checks
their channel dims only, so they prune; a real channel mismatch after such an op is still
caught; RoI pooling passes channels; training-mode inputs; meta traces leave no caches."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import Tensor, nn

import prunekit as pk
from prunekit.surgery.reference import masked_reference
from prunekit.surgery.validate import value_shaped


class Selects(nn.Module):
    """A tiny two-stage 'detector': dense features, a score per position, the positions
    above a threshold (how many depends on values), then a hidden layer and a predictor on
    the selected feature vectors. ``hard`` hard-codes the hidden width in a view."""

    def __init__(self, hard: bool = False) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.score = nn.Conv2d(16, 1, 1)
        self.hidden, self.out = nn.Linear(16, 12), nn.Linear(12, 5)
        self.hard = hard

    def dense(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = torch.relu(self.c2(torch.relu(self.c1(x))))
        return f, self.score(f)

    def forward(self, x: Tensor) -> Tensor:
        f, s = self.dense(x)
        keep = torch.where(s.flatten() > 0)[0]
        vectors = f.flatten(2)[0].t()[keep]  # (n selected, 16)
        h = torch.relu(self.hidden(vectors))
        if self.hard:
            h = h.view(-1, 12)  # the width is fixed by the code
        return self.out(h)


def _prune(model: nn.Module, x: Tensor, **kw: object) -> tuple[nn.Module, pk.PruningPlan]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pk.PruningShortfallWarning)
        return pk.prune(model, x, ratio=0.5, ignore=["score", "out"], return_plan=True, **kw)


def test_value_shaped_ops_prune_and_match_the_masked_reference() -> None:
    torch.manual_seed(0)
    model, x = Selects().eval(), torch.randn(1, 3, 8, 8)
    graph = pk.trace(model, x, ignore=["score", "out"])
    flags = value_shaped(graph.ops("eval"))
    names = [op.name for op, f in zip(graph.ops("eval"), flags) if f]
    assert "where" in names and "linear" in names  # the hidden layer's input follows the selection
    assert not any(flags[:[op.name for op in graph.ops("eval")].index("where")])  # the dense part is exact-checked
    small, plan = _prune(model, x)
    assert plan.meta["repairs"] == [] and small.c1.out_channels == 8 and small.hidden.out_features == 6
    ref = masked_reference(model, graph, plan)
    with torch.no_grad():
        torch.testing.assert_close(small.dense(x)[1], ref.dense(x)[1])  # the scores the selection reads
        y, r = small(x), ref(x)
    # The pruned network is the masked reference: the same boxes survive, with the same outputs.
    assert y.shape == r.shape and y.shape[0] > 0
    torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-5)


def test_a_channel_mismatch_after_a_value_shaped_op_is_still_caught() -> None:
    torch.manual_seed(0)
    model, x = Selects(hard=True).eval(), torch.randn(1, 3, 8, 8)
    small, plan = _prune(model, x)
    # The view hard-codes the hidden width: that group stays, the convs still prune.
    assert small.hidden.out_features == 12 and small.c1.out_channels == 8
    assert any(r.startswith("hidden") for r in plan.meta["repairs"])
    with torch.no_grad():
        assert small(x).shape[1] == 5


class Pools(nn.Module):
    """Features -> RoI Align over fixed boxes -> a linear head (the Fast R-CNN pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 4)

    def forward(self, x: Tensor, rois: Tensor) -> Tensor:
        f = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torchvision.ops.roi_align(f, rois, (2, 2), spatial_scale=1.0).flatten(1))


def test_roi_align_passes_channels_exactly() -> None:
    torch.manual_seed(0)
    model = Pools().eval()
    inputs = (torch.randn(1, 3, 12, 12), torch.tensor([[0, 1.0, 1.0, 6.0, 7.0], [0, 3.0, 2.0, 11.0, 10.0]]))
    graph = pk.trace(model, inputs, ignore=["fc"])
    small, plan = pk.prune(model, inputs, ratio=0.5, graph=graph, return_plan=True)
    assert small.c2.out_channels == 3 and small.fc.in_features == 12
    with torch.no_grad():
        torch.testing.assert_close(small(*inputs), masked_reference(model, graph, plan)(*inputs))


class NeedsTargets(nn.Module):
    """In training mode it wants targets (as torchvision's detectors) and returns a loss
    dict; it caches a tensor attribute in forward (as torchvision's anchor generator)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.cache: Tensor | None = None

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        self.cache = torch.ones(2, device=x.device)  # a per-call cache on the input's device
        y = self.c2(torch.relu(self.c1(x))) * self.cache[0]
        if self.training:
            if targets is None:
                raise AssertionError("targets should not be none when in training mode")
            return {"loss": ((y.mean((2, 3)) - targets) ** 2).mean()}
        return y


def test_training_mode_inputs_and_no_meta_caches_left_behind() -> None:
    torch.manual_seed(0)
    model, x = NeedsTargets().eval(), torch.randn(2, 3, 6, 6)
    with pytest.raises(pk.PruningError, match="ModeInputs"):
        pk.trace(model, x)
    assert model.cache is None or model.cache.device.type == "cpu"
    inputs = pk.ModeInputs(eval=x, train=(x, torch.zeros(2, 4)))
    graph = pk.trace(model, inputs, ignore=["c2"])
    assert set(graph.state.ops) == {"eval", "train"}
    assert model.cache is None or model.cache.device.type == "cpu"  # the meta pass's cache is gone
    small, plan = pk.prune(model, inputs, ratio=0.5, graph=graph, return_plan=True)
    assert small.c1.out_channels == 4
    ref = masked_reference(model, graph, plan)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x))
        small.train(), ref.train()
        torch.testing.assert_close(small(x, torch.ones(2, 4))["loss"], ref(x, torch.ones(2, 4))["loss"])


class IntegerRearranged(nn.Module):
    """An integer tensor rearranged like a float one (torchvision's RPN: ``levels.reshape(1,
    -1).expand_as(objectness)``): its values are level ids, not channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.c2(torch.relu(self.c1(x))).flatten(1)  # (1, H*W)
        levels = torch.arange(scores.shape[1]).remainder(4).reshape(1, -1).expand_as(scores)
        return scores * (levels + 1)


def test_rearranged_integer_tensors_carry_no_channels() -> None:
    torch.manual_seed(0)
    model, x = IntegerRearranged().eval(), torch.randn(1, 3, 6, 6)
    graph = pk.trace(model, x, ignore=["c2"])
    expand = next(op for op in graph.ops("eval") if op.name == "expand_as")
    assert not bool(expand.out_labs[0].any())  # the level ids 1..4 were read as atoms 1..4 before
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert plan.meta["repairs"] == [] and small.c1.out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_reference(model, graph, plan)(x))
