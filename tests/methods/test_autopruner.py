"""AutoPruner (method ``autopruner``): its loss by hand, the layer-by-layer life cycle, the
keep rate from the budget, expected against measured FLOPs, exact resume of the selection
layers. (Planted channels, the budget and the user's model: tests/methods/test_learned_masks.py.)"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from learned_nets import DEAD, IMPORTANT, X, Interrupting, config, planted
from nets import cbr
from prunekit import methods
from prunekit.allocate.cost import CostModel
from prunekit.config import PruneConfig
from prunekit.gates.autopruner import FROZEN, WAITING
from prunekit.measure import count_flops
from prunekit.methods._training import ExpectedCost
from prunekit.methods.autopruner import (AutoPrunerOptions, _Selection, layer_spans, selection_layers,
                                         uniform_keep_rate)
from prunekit.recover import TrainConfig, train


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(cbr(3, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(5, 3, 6, 6)
    return net, x, torch.tensor([0, 1, 2, 1, 0])


def test_loss_is_the_task_loss_plus_the_keep_rate_term_computed_by_hand() -> None:
    """One training step on one batch of 5: the loop's task loss is the cross-entropy of the
    network whose BN -> ReLU output is multiplied by ``v = sigmoid(alpha * (W p + b))``, ``p``
    the mean of the ReLU output over the batch and the positions (BN on batch statistics);
    its extra term is ``lambda * (mean(v) - r)^2``."""
    net, x, y = _tiny()
    reference = copy.deepcopy(net)
    graph = pk.trace(net.eval(), x[:1], ignore=["3"])
    opts = AutoPrunerOptions(reg=3.0, alpha_start=2.5, alpha_end=7.0)
    gates = selection_layers(net, graph, opts, seed=4)
    (group,) = gates.forward_order()
    gate = gates.gate(group.index)
    assert gate.relu and int(gate.state) == WAITING  # BN -> ReLU: pools the activation; layer by layer
    w, b = gate.fc.weight.detach().clone(), gate.fc.bias.detach().clone()
    selection = _Selection(gates, [group], layer_spans(1, 1, True), opts, keep_rate=0.4)
    cfg = TrainConfig(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", tensorboard=False)
    record = train(net, [(x, y)], cfg, progress=False, callbacks=[selection]).history[0]

    conv, bn, fc = reference[0][0], reference[0][1], reference[3]
    with torch.no_grad():
        z = F.batch_norm(F.conv2d(x, conv.weight, padding=1), None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        a = torch.relu(z)
        v = torch.sigmoid(2.5 * (w @ a.mean((0, 2, 3)) + b))
        task = F.cross_entropy(fc((a * v.view(1, -1, 1, 1)).mean((2, 3))), y)
        term = 3.0 * (v.mean() - 0.4) ** 2
    assert record["train_loss"] == pytest.approx(float(task), rel=1e-5)
    assert record["train_extra_loss"] == pytest.approx(float(term), rel=1e-5)
    assert float(term) > 1e-4  # the term is really there
    torch.testing.assert_close(gate.last_code, v)
    assert int(gate.state) == FROZEN and selection.frozen[group.name]["kept"] == round(0.4 * 4)


def test_codes_binarise_as_alpha_grows() -> None:
    """Fixed FC and input: the code is ``sigmoid(alpha * x)`` (by hand), and the fraction of
    codes within 0.01 of 0 or 1 grows with alpha to 1 once ``alpha * min|x| >= logit(0.99)``."""
    from prunekit.gates.autopruner import AutoPrunerGate
    from prunekit.methods._training import binary_fraction

    torch.manual_seed(1)
    gate = AutoPrunerGate(16).train()
    act = torch.rand(4, 16, 3, 3)
    x = gate.fc(act.mean((0, 2, 3))).detach()
    logit99 = float(torch.logit(torch.tensor(0.99, dtype=torch.float64)))
    enough = logit99 / float(x.abs().min()) * 1.01
    alphas = [1.0, 3.0, 10.0, 30.0, enough]
    fractions = []
    for alpha in alphas:
        gate.alpha.fill_(alpha)
        code = gate.multiplier(act, 1).detach()
        torch.testing.assert_close(code, torch.sigmoid(alpha * x))
        fractions.append(binary_fraction(code))
    assert fractions == sorted(fractions) and fractions[0] < 0.5 and fractions[-1] == 1.0


def test_layer_spans_split_the_steps_in_order() -> None:
    assert layer_spans(3, 7, True) == [(1, 3), (4, 5), (6, 7)]
    assert layer_spans(5, 2, True) == [(1, 1), (1, 1), (2, 2), (2, 2), (2, 2)]  # more layers than steps
    assert layer_spans(3, 7, False) == [(1, 7)] * 3
    with pytest.raises(pk.PruningError, match="no training steps"):
        layer_spans(2, 0, True)


def test_layer_by_layer_trains_one_layer_at_a_time_then_freezes_it() -> None:
    """Two epochs of four steps, two layers: after epoch 1 the first layer is frozen at alpha
    100 and the second still waits at alpha 1; after epoch 2 both are frozen. All at once,
    both are active after epoch 1 with alpha at 3 of its 7 steps. The planted dead channel
    goes and the important one stays in both runs of the paper's mode."""
    model, data, _ = planted(norm=False)
    kw: dict[str, Any] = dict(loader=data, epochs=2, train_config=config(2), ratio=0.3, ignore=["4"])
    res = methods.get("autopruner")(model, X, **kw)
    first, second = res.info["trajectory"]
    assert first["state"] == {"0.0": "frozen", "1.0": "waiting"} and first["alpha"] == {"0.0": 100.0, "1.0": 1.0}
    assert second["state"] == {"0.0": "frozen", "1.0": "frozen"} and second["alpha"]["1.0"] == 100.0
    assert [(r["first_step"], r["last_step"]) for r in res.info["layers"]] == [(1, 4), (5, 8)]
    assert res.info["frozen"]["0.0"]["step"] == 4 and res.info["frozen"]["1.0"]["step"] == 8
    assert res.info["finetune"]["epochs"] == 1
    together = methods.get("autopruner")(model, X, layer_by_layer=False, **kw)
    first = together.info["trajectory"][0]
    assert first["state"] == {"0.0": "active", "1.0": "active"}
    assert first["alpha"]["0.0"] == pytest.approx(1 + 99 * 3 / 7)
    longer = methods.get("autopruner")(model, X, **{**kw, "epochs": 12, "train_config": config(12)})
    kept = set(longer.plan.keep["0.0.weight"][0])
    assert DEAD not in kept and IMPORTANT in kept
    # At alpha 100 the last codes are (nearly) binary: only |x| < logit(0.99) / 100 is not.
    assert all(r["alpha"] == 100.0 and r["binary_fraction"] >= 0.8 for r in longer.info["frozen"].values())
    assert longer.info["binary_fraction"] >= 0.9


def test_keep_rate_meets_the_budget_when_every_layer_keeps_it() -> None:
    """Oracle: prune every group to the uniform keep rate with pk.prune (per-group ratio
    ``1 - r``) and count the FLOPs; for a ratio budget ``r = 1 - ratio``."""
    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 128), cbr(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 5)).eval()
    graph = pk.trace(model, X, ignore=["4"])
    cost = CostModel(graph, model, X)
    gated = {g.index for g in graph.groups if g.n_prunable}
    r = uniform_keep_rate(ExpectedCost(cost, PruneConfig(target_flops=0.5)), gated)
    small = pk.prune(model, X, ratio=1 - round(r * 128) / 128, ignore=["4"])  # r * 128 channels, rounded
    assert [small[0][0].out_channels, small[1][0].out_channels] == [round(r * 128)] * 2
    assert count_flops(small, X) / count_flops(model, X) == pytest.approx(0.5, abs=0.01)
    assert uniform_keep_rate(ExpectedCost(cost, PruneConfig(ratio=0.3)), gated) == pytest.approx(0.7)


@pytest.mark.parametrize("layer_by_layer", [True, False])
def test_expected_flops_at_the_end_match_the_pruned_model(layer_by_layer: bool) -> None:
    """The cost model at the frozen codes (the expected FLOPs at the end of training) within
    1% of the FLOPs counted on the pruned model, which is on the 50% target."""
    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 128), cbr(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 5)).eval()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(2)]
    res = methods.get("autopruner")(model, X, loader=data, epochs=4, train_config=config(4), target_flops=0.5,
                                    ignore=["4"], layer_by_layer=layer_by_layer, finetune_epochs=0)
    measured = count_flops(res.model, X) / count_flops(model, X)
    assert 0.49 <= measured <= 0.5
    assert res.info["budget"]["expected_end_flops"] == pytest.approx(measured, abs=0.01)


def test_kill_and_resume_gives_identical_selection_layers(tmp_path) -> None:
    """The gated network (weights, selection FCs, running codes, frozen codes, alpha, state)
    after two epochs in one go equals a run killed in the second epoch (while the second
    layer trains) and resumed from its checkpoint; so do the freeze records."""

    def run(loader: Any, run_dir: Any, resume: bool = False) -> tuple[dict, dict]:
        model, data, _ = planted(norm=False)
        graph = pk.trace(model.eval(), X, ignore=["4"])
        opts = AutoPrunerOptions()
        gates = selection_layers(model, graph, opts, seed=0)
        order = gates.forward_order()
        selection = _Selection(gates, order, layer_spans(len(order), 8, True), opts, keep_rate=0.7)
        train(model, loader if loader is not None else data, config(2), run_dir=run_dir, resume=resume,
              progress=False, callbacks=[selection])
        return {k: v.clone() for k, v in model.state_dict().items()}, selection.frozen

    data = planted(norm=False)[1]
    whole, frozen = run(None, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(Interrupting(data, 7), tmp_path / "b")
    resumed, frozen_resumed = run(None, tmp_path / "b", resume=True)
    assert any(".prunekit_gate_" in k and k.endswith("fc.weight") for k in whole)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert frozen == frozen_resumed and set(frozen) == {"0.0", "1.0"}


def test_options_are_checked() -> None:
    model = planted(norm=False)[0]
    for bad, match in [({"alpha_start": 5.0, "alpha_end": 2.0}, "alpha_start <= alpha_end"),
                       ({"keep_rate": 0.0}, "keep_rate"), ({"reg": -1.0}, "reg"),
                       ({"finetune_epochs": -1}, "finetune_epochs"), ({"selection_lr": -1.0}, "selection_lr")]:
        with pytest.raises(ValueError, match=match):
            methods.get("autopruner")(model, X, loader=[], ratio=0.5, **bad)


def test_selection_lr_puts_the_selection_layers_in_their_own_param_group() -> None:
    model, data, _ = planted(norm=False)
    graph = pk.trace(model.eval(), X, ignore=["4"])
    opts = AutoPrunerOptions(selection_lr=0.003)
    gates = selection_layers(model, graph, opts, seed=0)
    order = gates.forward_order()
    seen = {}

    class Probe(_Selection):
        def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            super().on_train_start(model, optimizer)
            seen["groups"] = [(g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]

    train(model, data[:1], dataclasses.replace(config(1), max_steps_per_epoch=1), progress=False,
          callbacks=[Probe(gates, order, layer_spans(2, 1, True), opts, keep_rate=0.7)])
    fcs = {id(p) for g in order for p in gates.gate(g.index).parameters()}
    assert (0.003, fcs) in seen["groups"]
    assert all(not (ids & fcs) for lr, ids in seen["groups"] if lr != 0.003)
