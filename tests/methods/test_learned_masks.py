"""What the methods that prune while training (slimming, scp, dais) share: planted channels,
the budget, expected against measured FLOPs, kill-and-resume identity, the user's model."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from nets import cbr
from prunekit import methods
from prunekit.errors import PruningError
from prunekit.measure import count_flops
from prunekit.recover import TrainConfig

LEARNED = ["slimming", "scp", "dais"]
X = torch.randn(1, 3, 8, 8)
DEAD, IMPORTANT = 3, 5  # channels of the first layer


def planted() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """conv3x3(3, 8) -> BN -> ReLU -> conv1x1(8, 6) -> BN -> ReLU -> pool -> fc(6, 5) built to
    solve its task: the second layer's output 0 is ``sum_c w_c a_c`` of the first layer's
    activations ``a_c`` (``w_5 = 3``, ``w_3 = 0``, the others 1), the labels are the quintiles
    of its pooled value and the classifier thresholds it at those quintiles. So every live
    channel of the first layer matters, channel 5 the most, and channel 3 is dead: its BN shift
    is -3 (the ReLU passes it with probability 0.13%) and no weight reads it. Four training and
    three held-out batches of 16 random images (three, so that a resumed run must know where
    it was in them)."""
    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 8), cbr(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    weights = torch.ones(8)
    weights[DEAD], weights[IMPORTANT] = 0.0, 3.0
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(7)]
    with torch.no_grad():
        model[0][1].bias[DEAD] = -3.0
        conv = model[1][0].weight  # (6, 8, 1, 1)
        conv.mul_(0.1)
        conv[0, :, 0, 0] = weights
        conv[:, DEAD] = 0
        model.train()
        for x in xs:
            model(x)  # BN statistics of the data
        model.eval()
        feature = torch.cat([model[:4](x)[:, 0] for x in xs])
        edges = torch.quantile(feature, torch.tensor([0.2, 0.4, 0.6, 0.8]))
        # Ordinal thresholds: logit_k = sum_{j < k} scale * (f - e_j), so class k wins between e_k and e_k+1.
        scale = 20.0 / float(feature.std())
        model[4].weight.zero_()
        model[4].bias.zero_()
        for k in range(1, 5):
            model[4].weight[k, 0] = scale * k
            model[4].bias[k] = -scale * float(edges[:k].sum())
        labels = torch.bucketize(feature, edges).split(16)
    data = list(zip(xs, labels))
    return model, data[:4], data[4:]


def config(epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=0.05, momentum=0.9, weight_decay=0.0, schedule="constant", seed=0,
                       tensorboard=False)


# Per method: options strong enough to act in a few dozen steps on the tiny net.
OPTIONS: dict[str, dict[str, Any]] = {"slimming": {"sparsity": 1e-2}, "scp": {"budget_weight": 0.3},
                                      "dais": {"indicator_lr": 0.1, "init": 1.0}}


def run(name: str, model: nn.Module, data: list, held: list, epochs: int, **kw: Any) -> methods.MethodResult:
    extra = {"val_loader": held} if name == "dais" else {}
    return methods.get(name)(model, X, loader=data, epochs=epochs, train_config=config(epochs), ratio=0.3,
                             min_channels=3, ignore=["4"], **OPTIONS[name], **{**extra, **kw})


@pytest.mark.parametrize("name", LEARNED)
def test_removes_a_planted_dead_channel_and_keeps_an_important_one(name: str) -> None:
    model, data, held = planted()
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


class Interrupting:
    """``batches`` as a loader that raises KeyboardInterrupt at its ``stop``-th batch overall
    (a kill in the middle of an epoch)."""

    def __init__(self, batches: list, stop: int) -> None:
        self.batches, self.stop, self.served = batches, stop, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            self.served += 1
            if self.served == self.stop:
                raise KeyboardInterrupt
            yield b


@pytest.mark.parametrize("name,stop,kw", [("slimming", 6, {}), ("slimming", 14, {"finetune_epochs": 2}),
                                          ("scp", 6, {}), ("dais", 6, {}), ("dais", 6, {"val_loader": None})],
                         ids=["slimming", "slimming-in-finetune", "scp", "dais", "dais-alternate"])
def test_kill_and_resume_gives_identical_weights_and_gates(name: str, stop: int, kw: dict, tmp_path) -> None:
    """Two epochs in one go against a run killed in its second epoch (or in the fine-tune's
    second) and resumed from the run directory: same weights, plan and trajectory."""
    model, data, held = planted()
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
