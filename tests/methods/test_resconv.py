"""ResConv: sites, fusion exactness, removal, the L1 term, budgets, resume, save/load/export."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import prunekit as pk
from prunekit import methods
from prunekit.errors import PruningError
from prunekit.measure import count_flops
from prunekit.methods.resconv import FactorL1, convert, finalize, find_sites, fuse
from prunekit.recover import TrainConfig
from prunekit.recover.checkpoint import load_checkpoint
from prunekit.surgery.factories import ResidualConv

X = torch.randn(1, 3, 16, 16)
CONSTANT = TrainConfig(epochs=1, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.0, schedule="constant",
                       tensorboard=False)


def _plain() -> nn.Module:
    from nets import PlainConvs, warmed

    torch.manual_seed(0)
    return warmed(PlainConvs())


def _batches(n: int = 3, classes: int = 5, shape: tuple[int, ...] = (8, 3, 16, 16)) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)) for _ in range(n)]


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


@pytest.mark.parametrize("conv,norm", [
    (nn.Conv2d(6, 6, 3, padding=1, bias=False), True),
    (nn.Conv2d(6, 6, 3, padding=1, groups=3), True),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), True),
    (nn.Conv2d(6, 6, 5, padding=4, dilation=2), False),
    (nn.Conv2d(6, 6, 1), True),
], ids=["plain", "grouped", "depthwise", "dilated-no-bn", "1x1"])
def test_fused_block_computes_the_block(conv: nn.Module, norm: bool) -> None:
    torch.manual_seed(0)
    block = ResidualConv(conv, _bn(6, 3) if norm else None, scale=-0.7).eval()
    fused = fuse(block)
    assert type(fused) is type(conv) and fused.bias is not None
    x = torch.randn(4, 6, 9, 9)
    with torch.no_grad():  # oracle: the block's own forward, x + s * BN(conv(x))
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)
        # The activation follows the add (what one conv followed by it computes); inside the
        # branch it would not fuse: the oracle can tell the placements apart.
        relu_inside = x + block.scale * torch.relu(block.norm(block.conv(x)) if norm else block.conv(x))
        assert not torch.allclose(torch.relu(fused(x)), relu_inside, atol=1e-3)


def test_sites_and_the_norms_that_move_into_them() -> None:
    model = _plain()
    sites, skipped = find_sites(model, pk.trace(model, X))
    assert [(s.conv, s.norm) for s in sites] == [("c1.0", "c1.1"), ("c2.0", "c2.1"), ("c3.0", None), ("c4.0", "c4.1")]
    assert set(skipped) == {"stem.0", "down.0", "fc"}
    assert find_sites(model, pk.trace(model, X), ("c2",))[1]["c2.0"] == "ignored"
    r18 = torchvision.models.resnet18(num_classes=10)
    names = [s.conv for s in find_sites(r18, pk.trace(r18, torch.randn(1, 3, 32, 32)))[0]]
    # Every stride-1 3x3 conv of the basic blocks; not the stem, the strided first convs or the 1x1 downsamples.
    want = [f"layer{i}.{j}.conv{k}" for i in (1, 2, 3, 4) for j in (0, 1) for k in (1, 2) if not (i > 1 and j == 0 and k == 1)]
    assert names == want


def test_converted_network_without_shortcuts_is_the_original() -> None:
    model = _plain()
    wrapped, sites, _ = convert(model, X, init_scale=0.3)
    assert isinstance(wrapped.c1[0], ResidualConv) and isinstance(wrapped.c1[1], nn.Identity)
    assert {"c1.0.scale", "c3.0.scale"} <= set(wrapped.state_dict())  # the factors are model parameters
    x = torch.randn(2, 3, 16, 16)
    for s in sites:
        wrapped.get_submodule(s.conv).shortcut = False
    torch.testing.assert_close(wrapped(x), model(x), rtol=1e-6, atol=1e-6)
    assert isinstance(model.c1[0], nn.Conv2d)  # the user's model is not converted


def test_fused_and_removed_layers_against_the_trained_network(tmp_path) -> None:
    """End to end: the trained ResConv network is read back from the run's checkpoint; the
    method's result equals it with the removed layers' factors set to 0, and fusing every
    layer (nothing removed) equals it as trained. The result exports to ONNX."""
    model = _plain()
    res = methods.get("resconv")(model, X, loader=_batches(), epochs=1, ratio=0.5, run_dir=tmp_path / "run",
                                 train_config=CONSTANT)
    assert len(res.info["removed"]) == 2 and res.info["selection"] == "ratio"
    by_size = sorted(res.info["factors"], key=lambda n: abs(res.info["factors"][n]))
    assert res.info["removed"] == by_size[:2]
    trained, sites, _ = convert(model, X)
    trained.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"])
    trained.eval()
    x = torch.randn(4, 3, 16, 16)
    ref = copy.deepcopy(trained)
    with torch.no_grad():
        for name in res.info["removed"]:
            ref.get_submodule(name).scale.zero_()
        torch.testing.assert_close(res.model(x), ref(x), rtol=1e-5, atol=1e-5)
        all_fused, _ = finalize(trained, sites, [])
        torch.testing.assert_close(all_fused(x), trained(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, ResidualConv) for m in res.model.modules())
    assert isinstance(res.model.get_submodule(res.info["removed"][0]), nn.Identity)
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the ONNX export is not checked")
    from prunekit.export import export_onnx

    assert export_onnx(res.model, X, tmp_path / "m.onnx")["match"]


def test_the_l1_term_has_gradient_lambda_sign_s() -> None:
    wrapped, sites, _ = convert(_plain(), X)
    values = [0.5, -0.3, 2.0, -1e-3]
    with torch.no_grad():
        for s, v in zip(sites, values):
            wrapped.get_submodule(s.conv).scale.fill_(v)
    term = FactorL1([s.conv for s in sites], l1=0.25)
    term.on_train_start(wrapped, None)  # type: ignore[arg-type]
    loss = term.extra_loss(wrapped, (X, None))
    assert float(loss.detach()) == pytest.approx(0.25 * sum(abs(v) for v in values))
    loss.backward()
    grads = [float(wrapped.get_submodule(s.conv).scale.grad) for s in sites]
    assert grads == pytest.approx([0.25 * (1 if v > 0 else -1) for v in values])


def test_l1_pulls_the_factors_down_and_records_their_trajectory() -> None:
    model = _plain()
    cfg = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant",
                      tensorboard=False)
    runs = {l1: methods.get("resconv")(model, X, loader=_batches(), train_config=cfg, l1=l1) for l1 in (0.0, 2.0)}
    mean = {l1: sum(abs(v) for v in r.info["factors"].values()) / 4 for l1, r in runs.items()}
    assert mean[2.0] < mean[0.0] - 0.1  # 6 steps of lr 0.05 * 2.0 pull each |s| down by up to 0.6
    traj = runs[2.0].info["factor_trajectory"]
    assert len(traj) == 2 and traj[-1] == runs[2.0].info["factors"]


def test_threshold_removes_small_factors_and_the_network_follows() -> None:
    model = _plain()
    gone = methods.get("resconv")(model, X, epochs=0, init_scale=0.005)  # every |s| under the 0.01 threshold
    assert gone.info["selection"] == "threshold" and len(gone.info["removed"]) == 4
    # Oracle: with every site's conv (and BN) an identity, the network is stem -> relu... -> down -> relu -> fc.
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = torch.relu(model.stem(x))
        h = torch.relu(torch.relu(torch.relu(h)))
        want = model.fc(torch.relu(model.down(h)).mean((2, 3)))
        torch.testing.assert_close(gone.model(x), want, rtol=1e-5, atol=1e-5)
    kept = methods.get("resconv")(model, X, epochs=0, init_scale=0.5)
    assert kept.info["removed"] == [] and len(kept.info["fused"]) == 4


def test_target_flops_takes_the_fewest_layers_by_factor_order() -> None:
    model = _plain()
    base = count_flops(model, X)
    res = methods.get("resconv")(model, X, epochs=0, target_flops=0.6)
    wrapped, sites, _ = convert(model, X)  # all factors equal: the order is the execution order
    order = [s.conv for s in sites]
    kept = [count_flops(finalize(wrapped, sites, order[:k])[0], X) / base for k in range(len(sites) + 1)]
    k = next(k for k, v in enumerate(kept) if v <= 0.6)  # brute force over every prefix
    assert res.info["removed"] == order[:k]
    assert res.info["budget"]["kept"] == pytest.approx(kept[k]) and res.info["budget"]["reached"]
    assert res.info["budget"]["within_tolerance"] == (0.6 - kept[k] <= 0.02)
    low = methods.get("resconv")(model, X, epochs=0, target_params=0.05)  # below what removing every layer keeps
    assert len(low.info["removed"]) == 4 and not low.info["budget"]["reached"]


def test_resume_continues_the_training_exactly(tmp_path) -> None:
    model = _plain()
    cfg = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.0, schedule="constant",
                      tensorboard=False)
    whole = methods.get("resconv")(model, X, loader=_batches(), train_config=cfg, run_dir=tmp_path / "a")
    methods.get("resconv")(model, X, loader=_batches(), train_config=cfg, epochs=1, run_dir=tmp_path / "b")
    resumed = methods.get("resconv")(model, X, loader=_batches(), train_config=cfg, run_dir=tmp_path / "b",
                                     resume=True)
    assert resumed.info["factors"] == whole.info["factors"]
    assert resumed.info["factor_trajectory"] == whole.info["factor_trajectory"]


def test_resnet18_budget_ignore_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    res = methods.get("resconv")(model, x, loader=data, target_flops=0.7, epochs=1, ignore=["layer1.0.conv1"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res.info["skipped"]["layer1.0.conv1"] == "ignored"
    kept = count_flops(res.model, x) / count_flops(model, x)
    assert 0.68 <= kept <= 0.7 and res.info["budget"]["within_tolerance"]  # 3x3 64->64 convs are 4.3% each
    pk.save(res.model, res.plan, tmp_path / "m")
    assert "residual_conv" not in (tmp_path / "m" / "plan.json").read_text()  # the saved model is plain convs
    loaded = pk.load(tmp_path / "m", model=lambda: torchvision.models.resnet18(num_classes=10)).eval()
    y = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(y), res.model(y), rtol=0, atol=0)


def test_bad_inputs_are_named() -> None:
    model = _plain()
    with pytest.raises(PruningError, match="l1=-1"):
        methods.get("resconv")(model, X, epochs=0, l1=-1)
    with pytest.raises(PruningError, match="target_latency is not supported"):
        methods.get("resconv")(model, X, epochs=0, target_latency=0.5)
    with pytest.raises(PruningError, match="pass loader="):
        methods.get("resconv")(model, X, epochs=1)
    with pytest.raises(PruningError, match="unknown option 'threshhold'"):
        methods.get("resconv")(model, X, epochs=0, threshhold=0.1)
    with pytest.raises(PruningError, match="no conv takes an identity shortcut"):
        methods.get("resconv")(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 2)), X, epochs=0)
    assert methods.get("resconv").trains is True
