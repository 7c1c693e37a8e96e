"""block_drop: exact dropping, rankings against brute force, budgets, channels after, save/load/export."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import prunekit as pk
from prunekit import methods
from prunekit.errors import PruningError
from prunekit.measure import count_flops

X = torch.randn(1, 3, 16, 16)
NAMES = ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]


def _net() -> nn.Module:
    from nets import TinyResNet, warmed

    torch.manual_seed(0)
    return warmed(TinyResNet())


def _inputs(n: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _blocks(net: nn.Module) -> list[nn.Module]:
    return [net.layer1[0], net.layer1[1], net.layer2[0], net.layer2[1]]


@torch.no_grad()
def _by_hand(net: nn.Module, x: torch.Tensor, skip: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The network written out, block ``skip``'s branch left out (relu(x + 0)); returns the
    logits and every block's input."""
    h = net.stem(x)
    inputs = []
    for i, b in enumerate(_blocks(net)):
        if i == 2:
            h = net.down(h)
        inputs.append(h)
        h = torch.relu(h) if i == skip else torch.relu(b.branch(h) + h)
    return net.fc(h.mean((2, 3))), inputs


def _names(keys: list[str]) -> list[str]:
    return [k.split("@")[0] for k in keys]


def test_dropping_a_branch_whose_output_is_zero_is_exact() -> None:
    model = _net()
    with torch.no_grad():
        model.layer1[1].bn2.weight.zero_()
        model.layer1[1].bn2.bias.zero_()
    res = methods.get("block_drop")(model, X, loader=_inputs(), ratio=0.25)
    assert _names(res.info["dropped"]) == ["layer1.1"] and res.info["scores"][res.info["dropped"][0]] == 0.0
    assert [type(s).__name__ + ":" + s.mode for s in res.plan.steps] == ["Drop:identity"] * 3 + ["Drop:zero"]
    assert isinstance(res.model.layer1[1].relu, nn.ReLU)  # also used after the add: it stays
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=0)
    assert count_flops(res.model, X) < count_flops(model, X)


@pytest.mark.parametrize("criterion", ["norm", "recon", "val_loss"])
def test_ranking_matches_brute_force(criterion: str) -> None:
    model = _net()
    data = _inputs()
    xs = torch.cat([x for x, _ in data])
    ys = torch.cat([y for _, y in data])
    kw = {"evaluate": lambda m: float(F.cross_entropy(m(xs), ys))} if criterion == "val_loss" else {}
    res = methods.get("block_drop")(model, X, loader=data, criterion=criterion, ratio=0.5, **kw)
    logits, inputs = _by_hand(model, xs)
    with torch.no_grad():
        if criterion == "norm":  # mean per-sample L2 norm of the branch output
            want = [float(b.branch(h).flatten(1).norm(dim=1).mean()) for b, h in zip(_blocks(model), inputs)]
        elif criterion == "recon":  # relative error of the next block's input (the logits after the last)
            want = []
            for i in range(4):
                new_logits, new_inputs = _by_hand(model, xs, skip=i)
                ref, new = (inputs[i + 1], new_inputs[i + 1]) if i < 3 else (logits, new_logits)
                want.append(float(((new - ref) ** 2).sum() / (ref ** 2).sum()))
        else:  # validation loss increase
            base = float(F.cross_entropy(logits, ys))
            want = [float(F.cross_entropy(_by_hand(model, xs, skip=i)[0], ys)) - base for i in range(4)]
    scores = {k.split("@")[0]: v for k, v in res.info["scores"].items()}
    assert [scores[n] for n in NAMES] == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert _names(res.info["order"]) == sorted(NAMES, key=lambda n: want[NAMES.index(n)])
    assert _names(res.info["dropped"]) == sorted(_names(res.info["order"])[:2], key=NAMES.index)


def test_val_loader_gives_the_val_loss_ranking_and_is_needed() -> None:
    model = _net()
    data = _inputs()
    xs, ys = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    by_fn = methods.get("block_drop")(model, X, criterion="val_loss", ratio=0.5,
                                      evaluate=lambda m: float(F.cross_entropy(m(xs), ys)))
    by_loader = methods.get("block_drop")(model, X, criterion="val_loss", ratio=0.5, val_loader=data)
    assert by_loader.info["order"] == by_fn.info["order"]
    with pytest.raises(PruningError, match="needs evaluate="):
        methods.get("block_drop")(model, X, criterion="val_loss")


def test_flops_target_against_the_brute_force_best_subset() -> None:
    """Block costs are additive: each subset's FLOPs are known by hand (2 per multiply-add
    of the branch convs). The greedy lands at or below the target, no farther from it than
    the smallest saving among the blocks it dropped, and never below the best subset's."""
    model = _net()
    total = count_flops(model, X)
    macs = [2 * 8 * 8 * 9 * 256, 2 * 8 * 8 * 256, 2 * 12 * 12 * 9 * 64, 2 * 12 * 12 * 64]
    saved = [2 * m / total for m in macs]
    for target in (0.9, 0.75, 0.6, 0.5, 0.3):
        res = methods.get("block_drop")(model, X, loader=_inputs(), target_flops=target)
        dropped = [NAMES.index(n) for n in _names(res.info["dropped"])]
        kept = count_flops(res.model, X) / total
        assert kept == pytest.approx(1 - sum(saved[i] for i in dropped), abs=1e-9)
        assert kept <= target and res.info["budget"]["kept"] == pytest.approx(kept)
        assert target - kept < min(saved[i] for i in dropped)
        best = max(1 - sum(saved[i] for i in s) for r in range(5) for s in itertools.combinations(range(4), r)
                   if 1 - sum(saved[i] for i in s) <= target)
        assert kept <= best + 1e-12
        assert res.info["budget"]["within_tolerance"] == (target - kept <= 0.02)


def test_then_channels_prunes_the_depth_pruned_network_and_saves(tmp_path) -> None:
    model = _net()
    res = methods.get("block_drop")(model, X, loader=_inputs(), target_flops=0.8,
                                    then_channels={"target_flops": 0.4})
    kinds = [type(s).__name__ for s in res.plan.steps]
    assert kinds[-1] == "Slice" and set(kinds[:-1]) == {"Drop"}
    kept = count_flops(res.model, X) / count_flops(model, X)
    assert 0.3 < kept <= 0.4 and res.info["flops_kept"] == pytest.approx(kept)  # 8 and 12 channels: coarse
    pk.save(res.model, res.plan, tmp_path / "m")
    loaded = pk.load(tmp_path / "m", model=_net).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.model(x), rtol=0, atol=0)
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the ONNX export is not checked")
    from prunekit.export import export_onnx

    assert export_onnx(res.model, X, tmp_path / "m.onnx")["match"]
    with pytest.raises(PruningError, match="nothing left for channels"):
        methods.get("block_drop")(model, X, loader=_inputs(), target_flops=0.5, then_channels={"target_flops": 0.9})


def test_resnet18_ignore_projection_blocks_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    res = methods.get("block_drop")(model, x, loader=data, target_params=0.92, ignore=["layer4"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _names(res.info["candidates"]) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1"]
    skipped = {k.split("@")[0]: v for k, v in res.info["skipped"].items()}
    assert skipped["layer4.1"] == "ignored" and skipped["layer2.0"].startswith("projection shortcut")
    assert res.info["budget"]["reached"] and res.info["budget"]["kept"] <= 0.92  # layer3.1 alone is 10.5%
    # The parameters sit in layer4: without it no subset reaches 0.5, which is reported, not hidden.
    low = methods.get("block_drop")(model, x, loader=data, target_params=0.5, ignore=["layer4"])
    assert not low.info["budget"]["reached"] and len(low.info["dropped"]) == 4
    pk.save(res.model, res.plan, tmp_path / "m")
    loaded = pk.load(tmp_path / "m", model=lambda: torchvision.models.resnet18(num_classes=10)).eval()
    y = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(y), res.model(y), rtol=0, atol=0)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x) * 2  # the branch ends in an op after its last module


def test_bad_inputs_and_blocks_that_cannot_go() -> None:
    model = _net()
    with pytest.raises(PruningError, match="unknown criterion 'l2'"):
        methods.get("block_drop")(model, X, loader=_inputs(), criterion="l2")
    with pytest.raises(PruningError, match="target_latency is not supported"):
        methods.get("block_drop")(model, X, loader=_inputs(), target_latency=0.5)
    with pytest.raises(PruningError, match="then_channels must be a ratio or a dict"):
        methods.get("block_drop")(model, X, loader=_inputs(), then_channels="half")
    with pytest.raises(PruningError, match="needs calibration data"):
        methods.get("block_drop")(model, X)
    with pytest.raises(PruningError, match="not the one producing the add's operand"):
        methods.get("block_drop")(_Scaled(), torch.randn(1, 3, 8, 8), loader=[torch.randn(2, 3, 8, 8)])
    from nets import PlainConvs

    with pytest.raises(PruningError, match="no residual branch can be dropped"):
        methods.get("block_drop")(PlainConvs(), X, loader=_inputs())
