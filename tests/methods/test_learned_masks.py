"""What the methods that prune while training (slimming, scp, dais, autopruner, colombo_gao) share: planted
channels, the budget, expected against measured FLOPs, kill-and-resume identity, the user's model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from learned_nets import DEAD, IMPORTANT, X, Interrupting, config, planted
from nets import cbr
from prunekit import methods
from prunekit.errors import PruningError
from prunekit.measure import count_flops

LEARNED = ["slimming", "scp", "dais", "autopruner", "colombo_gao"]


# Per method: options strong enough to act in a few dozen steps on the tiny net.
OPTIONS: dict[str, dict[str, Any]] = {"slimming": {"sparsity": 1e-2}, "scp": {"budget_weight": 0.3},
                                      "dais": {"indicator_lr": 0.1, "init": 1.0}, "autopruner": {}, "colombo_gao": {}}
# AutoPruner learns its codes from the task gradient in training mode, which a training-mode
# BatchNorm after the planted layer makes blind to the layer's scale (see planted's docstring):
# its planted net has no second BN.
NETS: dict[str, Any] = {"autopruner": lambda: planted(norm=False)}


def planted_for(name: str) -> tuple[nn.Module, list, list]:
    """The planted net (model, training batches, held-out batches) method ``name`` is tested on."""
    return NETS.get(name, planted)()


def run(name: str, model: nn.Module, data: list, held: list, epochs: int, **kw: Any) -> methods.MethodResult:
    extra = {"val_loader": held} if name == "dais" else {}
    return methods.get(name)(model, X, loader=data, epochs=epochs, train_config=config(epochs), ratio=0.3,
                             min_channels=3, ignore=["4"], **OPTIONS[name], **{**extra, **kw})


@pytest.mark.parametrize("name", LEARNED)
def test_removes_a_planted_dead_channel_and_keeps_an_important_one(name: str) -> None:
    model, data, held = planted_for(name)
    before = copy.deepcopy(model.state_dict())
    res = run(name, model, data, held, epochs=12)
    kept = set(res.plan.keep["0.0.weight"][0])
    assert DEAD not in kept and IMPORTANT in kept
    assert len(kept) < 8 - 1  # more than the dead channel went: the ranking chose
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    assert not any("prunekit_gate" in n for n, _ in res.model.named_modules())


@pytest.mark.parametrize("name", LEARNED)
def test_budget_and_expected_against_measured_flops(name: str) -> None:
    """The target is met within 1% (FLOPs counted on the pruned model; 128-channel layers, so
    one channel is below 1% of the FLOPs); the cost model at the selected binary mask equals
    that count (within 1%); the trajectory has one entry per epoch."""
    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 128), cbr(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 5)).eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(3)]
    data, held = batches[:2], batches[2:]
    epochs = 3
    res = methods.get(name)(model, X, loader=data, epochs=epochs, train_config=config(epochs), target_flops=0.5,
                            ignore=["4"], **OPTIONS[name], **({"val_loader": held} if name == "dais" else {}))
    measured = count_flops(res.model, X) / count_flops(model, X)
    budget = res.info["budget"]
    assert 0.49 <= measured <= 0.5
    assert budget["measured_flops"] == pytest.approx(measured, rel=1e-9)
    assert budget["selected_flops"] == pytest.approx(measured, rel=0.01)
    assert [t["epoch"] for t in res.info["trajectory"]] == list(range(1, epochs + 1))
    if name != "slimming":
        assert all(set(t["keep"]) == {"0.0", "1.0"} and t["target"] == 0.5 for t in res.info["trajectory"])
        assert all(0.0 <= v <= 1.0 for t in res.info["trajectory"] for v in t["keep"].values())
        assert res.info["trajectory"][-1]["expected_flops"] == pytest.approx(budget["expected_end_flops"])


@pytest.mark.parametrize("name,stop,kw", [("slimming", 6, {}), ("slimming", 14, {"finetune_epochs": 2}),
                                          ("scp", 6, {}), ("dais", 6, {}), ("dais", 6, {"val_loader": None}),
                                          ("autopruner", 6, {}), ("autopruner", 14, {"finetune_epochs": 2}),
                                          ("autopruner", 6, {"layer_by_layer": False}), ("colombo_gao", 6, {})],
                         ids=["slimming", "slimming-in-finetune", "scp", "dais", "dais-alternate", "autopruner",
                              "autopruner-in-finetune", "autopruner-all-at-once", "colombo_gao"])
def test_kill_and_resume_gives_identical_weights_and_gates(name: str, stop: int, kw: dict, tmp_path) -> None:
    """Two epochs in one go against a run killed in its second epoch (or in the fine-tune's
    second) and resumed from the run directory: same weights, plan and trajectory."""
    model, data, held = planted_for(name)
    whole = run(name, model, data, held, epochs=2, run_dir=tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):
        run(name, model, Interrupting(data, stop), held, epochs=2, run_dir=tmp_path / "b", **kw)
    resumed = run(name, model, data, held, epochs=2, run_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.info["train"]["resumed_from_epoch"] == (2 if stop > 8 else 1)
    assert resumed.plan.keep == whole.plan.keep
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.info["trajectory"] == whole.info["trajectory"]


@pytest.mark.parametrize("name", LEARNED)
def test_training_methods_need_data_and_say_they_train(name: str) -> None:
    fn = methods.get(name)
    assert getattr(fn, "trains", False) is True
    with pytest.raises(PruningError, match="trains the network"):
        fn(planted()[0], X, ratio=0.5)
    with pytest.raises(PruningError, match="unknown option"):
        fn(planted()[0], X, loader=[], ratio=0.5, nonsense=1)
