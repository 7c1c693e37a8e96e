"""Colombo & Gao: the two-temperature gate, frozen weights, expected against measured FLOPs,
transfer to a new task (re-initialised, new head) and its kill-and-resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from learned_nets import X, Interrupting, config, planted
from nets import cbr
from prunekit import methods
from prunekit.errors import PruningError
from prunekit.gates import attach_gates
from prunekit.gates.two_temperature import TwoTemperatureGate
from prunekit.measure import count_flops
from prunekit.methods.colombo_gao import transfer


def test_two_temperature_gate_by_hand() -> None:
    """Eval: ``sigmoid(theta / T_p)``; training after a draw: ``sigmoid((theta / T_p + L) / T_s)``
    with ``L = log u - log(1 - u)`` from torch's generator (redrawn here under the same seed);
    importance ``theta / T_p``."""
    gate = TwoTemperatureGate(4, init=0.0, selection_temperature=0.25, sample_temperature=0.5)
    theta = np.array([-1.0, -0.1, 0.2, 2.0])
    with torch.no_grad():
        gate.logit.copy_(torch.tensor(theta, dtype=torch.float32))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    gate.eval()
    np.testing.assert_allclose(gate.values().detach().numpy(), sig(theta / 0.25), rtol=1e-5)
    np.testing.assert_allclose(gate.importance(), theta / 0.25, rtol=1e-5)
    gate.train()
    torch.manual_seed(3)
    gate.resample()
    torch.manual_seed(3)
    u = torch.rand(4).clamp_(1e-6, 1 - 1e-6).double().numpy()
    want = sig((theta / 0.25 + np.log(u) - np.log1p(-u)) / 0.5)
    np.testing.assert_allclose(gate.values().detach().numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(gate.expected_values().detach().numpy(), sig(theta / 0.25), rtol=1e-5)
    with pytest.raises(PruningError, match="cannot be bound"):
        gate.bind([])


def test_relaxed_samples_pass_half_with_the_selection_probability() -> None:
    """Monte Carlo: a binary Concrete sample exceeds 1/2 exactly when the Bernoulli it relaxes
    is 1, so over 40000 draws the fraction above 1/2 is ``p = sigmoid(theta / T_p)`` at any
    sampling temperature (within 1%, 4 standard errors)."""
    n, theta, t_p = 40000, 0.3, 0.5
    p = 1 / (1 + math.exp(-theta / t_p))
    for t_s in (0.1, 1.0):
        gate = TwoTemperatureGate(n, init=theta, selection_temperature=t_p, sample_temperature=t_s).train()
        torch.manual_seed(0)
        gate.resample()
        frac = float((gate.values() > 0.5).double().mean())
        assert abs(frac - p) < 0.01


def _wide() -> tuple[nn.Module, list]:
    """Two 128-channel conv -> BN -> ReLU layers (one channel is below 1% of the FLOPs) and
    two batches of random labels: the complexity penalty alone decides."""
    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 128), cbr(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 5)).eval()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(2)]
    return model, data


def test_expected_flops_at_the_end_match_the_measured_flops() -> None:
    """After 60 steps the selection probabilities are binary (annealed selection
    temperature) and their expected FLOPs equal the pruned model's counted FLOPs within 1%,
    which meet the 50% target within 1%."""
    model, data = _wide()
    epochs = 30
    res = methods.get("colombo_gao")(model, X, loader=data, epochs=epochs, train_config=config(epochs),
                                     target_flops=0.5, ignore=["4"])
    measured = count_flops(res.model, X) / count_flops(model, X)
    budget = res.info["budget"]
    assert 0.49 <= measured <= 0.5
    assert res.info["binary_fraction"] >= 0.99
    assert abs(budget["expected_end_flops"] - measured) <= 0.01
    assert res.info["final_selection_temperature"] == pytest.approx(0.02)


def test_the_weights_are_frozen_during_the_search() -> None:
    """The pruned convs and the classifier are the original's, sliced, bit for bit (the
    training loop at lr 0.05 would have moved them) and the BN running statistics too (the
    network ran in eval mode); only the BN affine parameters carry the folded probabilities,
    which are near 1 for the kept channels."""
    model, data, _ = planted()
    res = methods.get("colombo_gao")(model, X, loader=data, epochs=6, train_config=config(6), ratio=0.3,
                                     min_channels=3, ignore=["4"])
    sliced = pk.apply_plan(model, res.plan).state_dict()
    got = res.model.state_dict()
    assert got.keys() == sliced.keys()
    for key, value in sliced.items():
        if key.endswith(("1.weight", "1.bias")) and key[0] in "01":  # the BN affine parameters: gate folded in
            torch.testing.assert_close(got[key], value, rtol=2e-2, atol=1e-6)
        else:
            assert torch.equal(got[key], value), key
    assert all(p.requires_grad for p in res.model.parameters())  # as the user's model had them


def _three_classes(n: int = 4, seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A new small task: three classes, class ``k`` brighter in input channel ``k``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 3, (16,), generator=g)
        x = torch.randn(16, 3, 8, 8, generator=g) * 0.5
        x[torch.arange(16), y] += 1.5
        out.append((x, y))
    return out


def test_transfer_reinitialises_every_tensor_and_replaces_the_head() -> None:
    """Oracle: the extracted architecture built afresh from PyTorch's constructors under the
    same seed, with a 3-class classifier: every parameter and buffer equal (no epochs
    trained). The plan, applied to the original, gives that architecture; the search's
    result and the user's model are unchanged."""
    model, data, _ = planted()
    before = copy.deepcopy(model.state_dict())
    res = methods.get("colombo_gao")(model, X, loader=data, epochs=4, train_config=config(4), ratio=0.3,
                                     min_channels=3, ignore=["4"])
    kept = copy.deepcopy(res.model.state_dict())
    assert res.info["head"] == "4"
    moved = transfer(res, _three_classes(), epochs=0, num_classes=3, seed=7)
    k1, k2 = (len(res.plan.keep[f"{i}.0.weight"][0]) for i in (0, 1))
    torch.manual_seed(7)
    fresh = nn.Sequential(cbr(3, k1), cbr(k1, k2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(k2, 3))
    got, want = moved.model.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert moved.model(X).shape == (1, 3) and moved.info["transfer"]["num_classes"] == 3
    rebuilt = pk.apply_plan(model, moved.plan)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in got.items()}
    assert all(torch.equal(v, res.model.state_dict()[k]) for k, v in kept.items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_transfer_trains_the_new_task_through_the_method() -> None:
    """``retrain_loader=`` / ``retrain_epochs=`` / ``num_classes=``: the re-initialised
    architecture learns the 3-class task (loss down to a third, accuracy on it above 90%)."""
    model, data, _ = planted()
    task = _three_classes()
    res = methods.get("colombo_gao")(model, X, loader=data, epochs=4, train_config=config(4), ratio=0.3,
                                     min_channels=3, ignore=["4"], retrain_loader=task, retrain_epochs=10,
                                     retrain_config=config(10), num_classes=3)
    history = [h["train_loss"] for h in res.info["transfer"]["history"]]
    assert len(history) == 10 and history[-1] < history[0] / 3
    with torch.no_grad():
        acc = torch.cat([res.model(x).argmax(1) == y for x, y in task]).double().mean()
    assert acc > 0.9
    with pytest.raises(PruningError, match="pass retrain_loader"):
        methods.get("colombo_gao")(model, X, loader=data, epochs=1, ratio=0.3, num_classes=3)
    with pytest.raises(PruningError, match="no prunable channel group"):
        methods.get("colombo_gao")(model, X, loader=data, epochs=1, ratio=0.3, ignore=["0.0", "1.0", "4"])


def test_kill_and_resume_during_the_transfer(tmp_path) -> None:
    """Search and transfer in one go against a run killed in the transfer's second epoch and
    resumed: the same weights, plan, transfer losses and search trajectory."""
    model, data, _ = planted()
    task = _three_classes()

    def run(retrain, run_dir, resume=False):
        return methods.get("colombo_gao")(model, X, loader=data, epochs=2, train_config=config(2), ratio=0.3,
                                         min_channels=3, ignore=["4"], retrain_loader=retrain, retrain_epochs=2,
                                         retrain_config=config(2), num_classes=3, run_dir=run_dir, resume=resume)

    whole = run(task, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(Interrupting(task, 6), tmp_path / "b")
    resumed = run(task, tmp_path / "b", resume=True)
    assert resumed.info["transfer"]["resumed_from_epoch"] == 1
    assert resumed.plan.keep == whole.plan.keep
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(h["train_loss"], h["train_acc"]) for h in r.info["transfer"]["history"]] for r in (whole, resumed)]
    assert losses[0] == losses[1]
    assert resumed.info["trajectory"] == whole.info["trajectory"]


def test_every_group_gets_a_two_temperature_gate_after_its_norm() -> None:
    """The search's gates: one per prunable group, at the BN (after the normalisation)."""
    model, _, _ = planted()
    gates = attach_gates(copy.deepcopy(model), pk.trace(model, X, ignore=["4"]), kind="two_temperature")
    assert sorted(gates.gates) == ["0", "1"]
    assert all([name for name, _, _ in gates.sites(g.index)] == [f"{g.index}.1"] for g in gates.groups)
