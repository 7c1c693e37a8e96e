"""The public API: options, errors that name the culprit, all-or-nothing behaviour."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from nets import NETS, FlattenVGG, Residual, TinyViT, cbr, randomize_bn
from prunekit.errors import PruningError
from prunekit.measure import count_params


def _same_state(a: nn.Module, b: dict) -> bool:
    return all(torch.equal(v, b[k]) for k, v in a.state_dict().items()) and a.state_dict().keys() == b.keys()


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_bad_ratio_raises_and_leaves_model(ratio) -> None:
    model = Residual()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match="ratio"):
        pk.prune(model, torch.randn(1, 3, 8, 8), ratio=ratio, inplace=True)
    assert _same_state(model, state)


def test_ignore_unknown_module_is_named() -> None:
    model = Residual()
    with pytest.raises(PruningError, match="no module named 'nope'"):
        pk.prune(model, torch.randn(1, 3, 8, 8), ignore=["nope"])
    with pytest.raises(PruningError, match="Linear is not part of the model"):
        pk.prune(model, torch.randn(1, 3, 8, 8), ignore=[nn.Linear(2, 2)])
    with pytest.raises(PruningError, match="ratios: no module named 'x.y'"):
        pk.prune(model, torch.randn(1, 3, 8, 8), ratios={"x.y": 0.3})


def test_ignored_module_keeps_its_output_channels() -> None:
    model = Residual()
    small = pk.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, ignore=[model.a[0][0]])
    assert small.a[0][0].out_channels == 12
    assert small.b[0][0].out_channels == 6


def test_unsupported_op_blocks_with_reason() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = cbr(3, 8), cbr(8, 8), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.c1(x)
            y = torch.sinc(y)  # an op without a rule
            return self.c3(self.c2(y))

    model = Odd()
    graph = pk.trace(model, torch.randn(1, 3, 8, 8))
    reasons = graph.unprunable()
    assert any("op 'sinc'" in r for rs in reasons.values() for r in rs)
    small = pk.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, graph=graph)
    assert small.c1[0].out_channels == 8 and small.c2[0].out_channels == 4


def test_model_output_channels_are_unprunable() -> None:
    graph = pk.trace(Residual(), torch.randn(1, 3, 8, 8))
    fc = [g for g in graph.groups if g.name == "fc"][0]
    assert fc.n_prunable == 0 and "model output" in fc.reasons[0]
    assert "reaches the model output" in str(graph)


def test_hard_coded_view_is_repaired_by_keeping_the_group() -> None:
    class HardCoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = cbr(3, 8), cbr(8, 6)
            self.fc = nn.Linear(6 * 16, 2)

        def forward(self, x):
            y = self.c2(self.c1(x))
            return self.fc(y.view(-1, 96))  # a size written in the code: cannot follow pruning

    model = HardCoded().eval()
    x = torch.randn(1, 3, 4, 4)
    small, plan = pk.prune(model, x, ratio=0.5, return_plan=True)
    assert small.c1[0].out_channels == 4  # still pruned
    assert small.c2[0].out_channels == 6  # kept whole, and the plan says why
    assert any("c2" in r and "'view'" in r for r in plan.meta["repairs"])
    assert small(x).shape == (1, 2)


def test_inplace_prunes_the_given_model() -> None:
    model = randomize_bn(Residual()).eval()
    x = torch.randn(1, 3, 8, 8)
    copy_small = pk.prune(model, x, ratio=0.5)
    same = pk.prune(model, x, ratio=0.5, inplace=True)
    assert same is model
    torch.testing.assert_close(model(x), copy_small(x))


class _TwoConvs(nn.Module):
    def __init__(self, first: type[nn.Conv2d] = nn.Conv2d) -> None:
        super().__init__()
        self.c1 = first(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


class _FixedOutChannels(nn.Conv2d):
    """A Conv2d whose ``out_channels`` can be set once (by ``__init__``), then is read-only."""

    @property
    def out_channels(self) -> int:  # type: ignore[override]
        return self.__dict__["_out"]

    @out_channels.setter
    def out_channels(self, value: int) -> None:
        if "_out" in self.__dict__:
            raise AttributeError("out_channels is read-only")
        self.__dict__["_out"] = value


def test_inplace_is_rolled_back_on_an_interrupt_during_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _TwoConvs()
    state = copy.deepcopy(model.state_dict())

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("prunekit.api.check", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pk.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, inplace=True)
    assert model.c1.weight.shape[0] == 8 and model.c1.out_channels == 8 and model.c2.in_channels == 8
    assert _same_state(model, state)


def test_inplace_is_rolled_back_when_a_module_attribute_cannot_be_fixed() -> None:
    model = _TwoConvs(_FixedOutChannels)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(AttributeError, match="read-only"):
        pk.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, inplace=True)
    assert model.c1.weight.shape[0] == 8 and model.c1.out_channels == 8 and model.c2.weight.shape[1] == 8
    assert _same_state(model, state)


def test_round_to_keeps_multiples() -> None:
    model = FlattenVGG()
    small = pk.prune(model, torch.randn(1, 3, 16, 16), ratio=0.3, round_to=4)
    assert small.features[0][0].out_channels % 4 == 0 and small.features[2][0].out_channels == 12
    assert small.features[0][0].out_channels == 8  # 8 -> floor(0.3*8)=2 removed -> 6 -> rounded up to 8


def test_per_module_ratios_override() -> None:
    model = Residual()
    small = pk.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, ratios={"a": 0.25})
    assert small.a[0][0].out_channels == 9 and small.b[0][0].out_channels == 6


def test_global_ranking_removes_the_global_fraction() -> None:
    torch.manual_seed(0)
    model = Residual()
    graph = pk.trace(model, torch.randn(1, 3, 8, 8))
    p = pk.plan_for(model, torch.randn(1, 3, 8, 8), ratio=0.4, global_ranking=True, graph=graph)
    assert p.meta["channels_removed"] == int(0.4 * graph.n_channels)


def test_min_channels_validated() -> None:
    with pytest.raises(PruningError, match="min_channels"):
        pk.prune(Residual(), torch.randn(1, 3, 8, 8), min_channels=0)


@torch.library.custom_op("prunekit_test::scaled_relu", mutates_args=())
def scaled_relu(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0) * 1.5


def test_custom_op_adapter_via_register_rule() -> None:
    from prunekit.graph import register_rule
    from prunekit.graph.rules import RULES, elementwise

    class WithCustom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c2(scaled_relu(self.c1(x)))

    model = WithCustom().eval()
    x = torch.randn(1, 3, 8, 8)
    # Unknown to prunekit: its channels stay, and the graph says why.
    graph = pk.trace(model, x)
    assert any("prunekit_test::scaled_relu" in r for rs in graph.unprunable().values() for r in rs)
    assert pk.prune(model, x, ratio=0.5).c1.out_channels == 8
    register_rule("prunekit_test::scaled_relu")(elementwise)  # the adapter: "it is element-wise"
    try:
        small = pk.prune(model, x, ratio=0.5)
        assert small.c1.out_channels == 4
        assert small(x).shape == model(x).shape
    finally:
        RULES.pop("prunekit_test::scaled_relu")


def test_graph_summary_lists_groups_and_members() -> None:
    graph = pk.trace(TinyViT(), torch.randn(1, 3, 16, 16))
    text = str(graph)
    assert "attn.qkv" in text and "mlp.0" in text
    qkv = [g for g in graph.groups if g.name.startswith("attn.qkv")][0]
    assert qkv.size == 4  # four heads: channels are whole heads


def test_an_unreachable_budget_raises_with_the_smallest_reachable_fraction() -> None:
    from prunekit.zoo import resolve_model

    model = resolve_model("small_cnn", in_chans=3)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError) as err:
        pk.prune(model, torch.randn(1, 3, 16, 16), target_flops=0.001, inplace=True)
    assert str(err.value) == "target_flops=0.001 cannot be met; the smallest model keeps 0.12% of the FLOPs"
    assert _same_state(model, state)


@pytest.mark.parametrize("budget", [{}, {"target_flops": 0.5}])
def test_example_inputs_of_the_wrong_shape_are_named(budget: dict) -> None:
    model = _TwoConvs()
    with pytest.raises(PruningError, match=r"example_inputs of shape \(1, 1, 8, 8\).*expected input.*3 channels") as err:
        pk.prune(model, torch.randn(1, 1, 8, 8), **budget)
    assert isinstance(err.value.__cause__, RuntimeError)  # torch's own message stays reachable
