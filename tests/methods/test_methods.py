"""Every registered method, and the mechanics each one promises."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import methods
from prunekit.errors import PruningError
from prunekit.measure import count_flops
from prunekit.methods.iterative import schedule


def _net() -> nn.Module:
    from nets import Residual

    torch.manual_seed(0)
    net = Residual()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 8, 8))
    return net.eval()


def _batches(n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


X = torch.randn(1, 3, 8, 8)


def _plain_net() -> nn.Module:
    from nets import PlainConvs, warmed

    torch.manual_seed(0)
    return warmed(PlainConvs(), (16, 3, 8, 8))


def _fc_net() -> nn.Module:
    """A conv flattened into two hidden FC layers and a classifier ``fc`` (partition's layers)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 128), nn.ReLU(),
                        nn.Linear(128, 128), nn.ReLU())
    net.add_module("fc", nn.Linear(128, 5))
    return net.eval()


# Methods whose net must have what they remove (ResConv: same-shape convs, which Residual lacks;
# partition: fully connected layers).
_NETS = {"resconv": _plain_net,
         "partition": _fc_net}
_OPTIONS: dict[str, dict] = {"ucp": {"steps": 5}, "resconv": {"epochs": 1}, "cacp": {"episodes": 2},
                             "partition": {"partitions": 2, "min_params": 1000}}


@pytest.mark.parametrize("name", methods.list_methods())
def test_every_method_meets_the_budget_and_leaves_the_model_alone(name: str, tmp_path) -> None:
    build = _NETS.get(name, _net)
    model = build()
    before = copy.deepcopy(model.state_dict())
    kw = dict(_OPTIONS.get(name, {}))
    if getattr(methods.get(name), "trains", False):  # the training-method convention: data and epochs
        kw.setdefault("epochs", 1)
    res = methods.get(name)(model, X, loader=_batches(), batches=3, target_flops=0.6, ignore=[model.fc], **kw)
    kept = count_flops(res.model, X) / count_flops(model, X)
    assert kept <= 0.6 and kept > 0.5 - 0.15  # coarse channels of a tiny net; the model really shrank
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The plan is relative to the original architecture: save + load reproduces the result.
    pk.save(res.model, res.plan, tmp_path / "m")
    loaded = pk.load(tmp_path / "m", model=build)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), res.model.eval()(x))


def _out_err(m: nn.Module, ref: nn.Module) -> float:
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return float(((m(x) - ref(x)) ** 2).mean())


def test_channel_pruning_reconstruction_beats_plain_lasso_removal() -> None:
    model = _net()
    fixed = methods.get("channel_pruning")(model, X, loader=_batches(), ratio=0.5, ignore=["fc"], layerwise=False)
    plain = methods.get("channel_pruning")(model, X, loader=_batches(), ratio=0.5, ignore=["fc"],
                                           reconstruct_layers=False, layerwise=False)
    assert fixed.plan.keep == plain.plan.keep
    assert _out_err(fixed.model, model) < 0.7 * _out_err(plain.model, model)


def test_cap_compensation_beats_plain_removal_of_the_same_channels() -> None:
    model = _net()
    res = methods.get("cap")(model, X, loader=_batches(), ratio=0.5, ignore=["fc"])
    plain = pk.apply_plan(model, res.plan)
    assert _out_err(res.model, model) < 0.7 * _out_err(plain, model)


def test_cap_search_takes_the_largest_ratio_under_a_linearly_falling_threshold() -> None:
    """Bottom-up bisection against a hand-computed oracle. Four 16-channel groups; the score
    only sees the architecture: 1 - sum_k w_k * removed_k / 16. With tolerance 0.4 the
    step-constrained thresholds are 1 - 0.1 (k + 1); with max_ratio 0.5 and 3 steps the
    bisection lands on ratios j/16 (j = 0..7), i.e. exactly j channels removed. Each group k
    takes the largest j keeping the score above its threshold, given the groups before it:
    group 0: 1*j <= 1.6 -> 1; group 1: 1 + 0.5*j <= 3.2 -> 4; group 2: 3 + 4*j <= 4.8 -> 0
    (not pruned, so absent); group 3: 3 + 0.1*j <= 6.4 -> 7, capped by the grid below
    max_ratio."""
    from nets import cbr

    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 16), cbr(16, 16), cbr(16, 16), cbr(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 5)).eval()
    weights = [1.0, 0.5, 4.0, 0.1]
    calls: list[list[int]] = []

    def score(m: nn.Module) -> float:
        removed = [16 - m[k][0].out_channels for k in range(4)]
        calls.append(removed)
        return 1 - sum(w * r for w, r in zip(weights, removed)) / 16

    res = methods.get("cap")(model, X, loader=_batches(), evaluate=score, tolerance=0.4, max_ratio=0.5,
                             search_steps=3, ignore=["6"])
    assert res.info["searched_ratios"] == {"0.0": 1 / 16, "1.0": 4 / 16, "3.0": 7 / 16}
    assert [res.model[k][0].out_channels for k in range(4)] == [15, 12, 16, 9]
    trials = res.info["trials"]
    assert [t["group"] for t in trials] == [g for g in ("0.0", "1.0", "2.0", "3.0") for _ in range(3)]
    # The threshold falls linearly, one step of tolerance / groups per group.
    np.testing.assert_allclose([t["threshold"] for t in trials[::3]], [0.9, 0.8, 0.7, 0.6])
    # Group 0 (accept iff 1 - j/16 >= 0.9) rejects 4 and 2 channels, accepts 1; group 3 accepts every step.
    assert [t["ratio"] for t in trials[:3]] == [0.25, 0.125, 0.0625]
    assert [t["ratio"] for t in trials[9:]] == [0.25, 0.375, 0.4375]
    # Each trial's model keeps the earlier groups' accepted counts and prunes its own group by
    # ratio * 16; it is scored once (after the original).
    accepted = [1, 4, 0, 7]
    expected = [[0, 0, 0, 0]] + [accepted[:k] + [int(t["ratio"] * 16)] + [0] * (3 - k)
                                 for k in range(4) for t in trials[3 * k:3 * k + 3]]
    assert calls == expected


def test_cap_search_profile_scaled_to_a_flops_budget() -> None:
    """With a budget as well, the searched ratios (the toy above: 1, 4, 0, 7 of 16 channels) are
    scaled by one factor s, capped at max_ratio 0.5 (8 channels): group k loses
    floor(min(8, s * j_k)) channels. Oracle: scan s upwards over the points where a width
    changes, build each candidate as a fresh network with those widths and count its FLOPs
    with torch's FlopCounterMode; the first that keeps at most 60% of the FLOPs is the answer."""
    from torch.utils.flop_counter import FlopCounterMode

    from nets import cbr

    def toy(widths: list[int]) -> nn.Module:
        layers, c_in = [], 3
        for w in widths:
            layers.append(cbr(c_in, w))
            c_in = w
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 5)).eval()

    def flops(m: nn.Module) -> int:
        with FlopCounterMode(display=False) as counter:
            m(X)
        return counter.get_total_flops()

    torch.manual_seed(0)
    model = toy([16] * 4)
    weights = [1.0, 0.5, 4.0, 0.1]

    def score(m: nn.Module) -> float:
        return 1 - sum(w * (16 - m[k][0].out_channels) for k, w in enumerate(weights)) / 16

    res = methods.get("cap")(model, X, loader=_batches(), evaluate=score, tolerance=0.4, max_ratio=0.5,
                             search_steps=3, ignore=["6"], target_flops=0.6)
    assert res.info["searched_ratios"] == {"0.0": 1 / 16, "1.0": 4 / 16, "3.0": 7 / 16}
    base = flops(model)
    oracle = None
    breaks = sorted({n / j for j in (1, 4, 7) for n in range(1, 9)})  # where some floor(s * j) steps
    for s in breaks:
        widths = [16 - int(np.floor(min(8, s * j) + 1e-9)) for j in (1, 4, 0, 7)]
        if flops(toy(widths)) <= 0.6 * base:
            oracle = widths
            break
    assert oracle is not None and oracle != [16, 16, 16, 16]
    assert [res.model[k][0].out_channels for k in range(4)] == oracle
    assert res.model[2][0].out_channels == 16  # left unpruned by the search, so not scaled
    assert res.info["scaled_ratios"]["3.0"] <= 0.5
    with pytest.raises(PruningError, match="cannot be met by scaling"):
        methods.get("cap")(model, X, loader=_batches(), evaluate=score, tolerance=0.4, max_ratio=0.5,
                           search_steps=3, ignore=["6"], target_flops=0.2)


def test_ucp_attention_finds_a_dead_channel() -> None:
    """Channel 3 of the stem's group feeds nothing (its consumer weights are zero): its
    attention gets no task gradient, only the (optional) L1 pull, so it ends among the lowest
    and goes at ratio 0.5 (labels are the model's own predictions, so useful channels are
    pulled up). The network is frozen (``train_network=False``): trained jointly, the zero
    consumer weights would get gradients and the channel would come alive."""
    from nets import cbr

    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 8), cbr(8, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    with torch.no_grad():
        model[1][0].weight[:, 3] = 0
        calib = [(x, model(x).argmax(1)) for x, _ in _batches()]
    res = methods.get("ucp")(model, X, loader=calib, steps=60, l1=0.01, lr=0.01, ratio=0.5, ignore=["4"],
                             train_network=False)
    assert 3 not in res.plan.keep["0.0.weight"][0]
    assert len(res.plan.keep["0.0.weight"][0]) == 4


def test_ucp_block_is_the_authors_se_layer() -> None:
    """Hand computation: sigmoid(W2 relu(W1 mean_positions(x))); hidden C // 16 without
    biases, or 1 with biases when C <= 16."""
    from prunekit.methods.ucp import Excitation

    big, small = Excitation(32), Excitation(8)
    assert (big.fc1.weight.shape, big.fc1.bias, big.fc2.weight.shape, big.fc2.bias) == ((2, 32), None, (32, 2), None)
    assert small.fc1.weight.shape == (1, 8) and small.fc1.bias is not None and small.fc2.bias is not None
    x = torch.randn(3, 32, 5, 5)
    w1, w2 = big.fc1.weight.detach(), big.fc2.weight.detach()
    expected = torch.sigmoid(torch.relu(x.mean((2, 3)) @ w1.T) @ w2.T)
    torch.testing.assert_close(big(x, 1), expected)


def test_ucp_blocks_scale_the_conv_output_before_its_bn() -> None:
    """conv -> SE -> BN, as the authors place the block: with the ``se`` gates attached at the
    producers the BN's input is the conv output times the block's scale."""
    from nets import cbr
    from prunekit.gates import attach_gates

    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 8), cbr(8, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    gates = attach_gates(model, pk.trace(model, X), kind="se", at="producers", reduction=16)
    assert [name for name, _, _ in gates.sites(0)] == ["0.0"]  # the conv, not its BN
    seen = []
    handle = model[0][1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model(x)
        raw = torch.nn.functional.conv2d(x, model[0][0].weight, padding=1)
        scale = gates.gate(0).blocks[0](raw, 1)
    handle.remove()
    gates.detach()
    torch.testing.assert_close(seen[0], raw * scale[:, :, None, None])


def _trained_cbr() -> nn.Module:
    """A small conv net whose every parameter and BN statistic is away from its initial value."""
    from nets import cbr

    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 8), cbr(8, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) + 1)
    return model.eval()


def test_ucp_reinitialise_resets_every_parameter_and_buffer() -> None:
    from prunekit.methods.ucp import reinitialise

    trained = _trained_cbr()
    fresh = copy.deepcopy(trained)
    torch.manual_seed(5)
    reinitialise(fresh)
    for name, t in [*trained.named_parameters(), *trained.named_buffers()]:
        if name.endswith("num_batches_tracked"):
            assert int(dict(fresh.named_buffers())[name]) == 0
            continue
        assert not torch.equal(dict([*fresh.named_parameters(), *fresh.named_buffers()])[name], t), name
    for bn in (fresh[0][1], fresh[1][1]):
        assert torch.equal(bn.running_mean, torch.zeros(bn.num_features))
        assert torch.equal(bn.running_var, torch.ones(bn.num_features))
        assert torch.equal(bn.weight.detach(), torch.ones(bn.num_features))
        assert torch.equal(bn.bias.detach(), torch.zeros(bn.num_features))
    # The oracle for the convs and the linear: PyTorch's own reset, drawn in module order under the same seed.
    torch.manual_seed(5)
    expected = [m for m in copy.deepcopy(trained).modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    for m in expected:
        m.reset_parameters()
    got = [m for m in fresh.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    for a, b in zip(got, expected):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb)


def test_ucp_reinitialise_refuses_tensors_it_cannot_reset() -> None:
    from prunekit.methods.ucp import reinitialise

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.gain = nn.Conv2d(3, 4, 1), nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.conv(x) * self.gain.view(1, -1, 1, 1)

    with pytest.raises(pk.PruningError, match="cannot re-initialise gain"):
        reinitialise(Scaled())


def _separable(n: int = 4, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two classes told apart by the sign of the image mean."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 2, (16,), generator=g)
        out.append((torch.randn(16, 3, 8, 8, generator=g) * 0.5 + (2.0 * y - 1).view(-1, 1, 1, 1), y))
    return out


def test_ucp_from_scratch_needs_data_to_retrain() -> None:
    with pytest.raises(pk.PruningError, match="from_scratch=True .* needs data to retrain"):
        methods.get("ucp")(_trained_cbr(), X, loader=_separable(), steps=2, ratio=0.5, ignore=["4"], from_scratch=True)


def test_ucp_from_scratch_resets_then_retrains() -> None:
    """The result is neither the trained weights nor the seeded reset (oracle: the pruned
    architecture reset under the same seed), and the retraining loss falls."""
    from prunekit.methods.ucp import reinitialise

    model = _trained_cbr()
    data = _separable()
    res = methods.get("ucp")(model, X, loader=data, steps=4, ratio=0.5, ignore=["4"], from_scratch=True,
                             retrain_loader=data, retrain_epochs=6, seed=7)
    reset = pk.apply_plan(model, res.plan)
    torch.manual_seed(7)
    reinitialise(reset)
    trained_pruned = pk.apply_plan(model, res.plan)
    for (name, p), r, t in zip(res.model.named_parameters(), reset.parameters(), trained_pruned.parameters()):
        assert p.shape == r.shape and not torch.equal(p, r) and not torch.equal(p, t), name
    history = [h["train_loss"] for h in res.info["retrain"]["history"]]
    assert len(history) == 6 and history[-1] < 0.5 * history[0]


def test_iterative_schedule_and_composed_plan() -> None:
    np.testing.assert_allclose(schedule(0.25, 2), [0.5, 0.25])
    np.testing.assert_allclose(schedule(0.5, 2, "linear"), [0.75, 0.5])
    model = _net()
    calls = []
    res = methods.get("iterative")(model, X, steps=3, target_flops=0.5, ignore=["fc"],
                                   recover=lambda m, step: calls.append(step))
    assert calls == [0, 1]  # recovery between steps, not after the last
    assert res.info["reached"][-1] <= 0.5
    assert res.info["reached"] == sorted(res.info["reached"], reverse=True)
    # The composed plan applied to the original reproduces the three-step result exactly.
    again = pk.apply_plan(model, res.plan)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), res.model(x))


def test_methods_need_data_and_known_names() -> None:
    with pytest.raises(pk.PruningError, match="method 'cap' needs calibration data"):
        methods.get("cap")(_net(), X, ratio=0.5)
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        methods.get("nope")
