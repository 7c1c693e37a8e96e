"""prunekit.decompose: low-rank factorisation against numpy's SVD, rank rules, budgets, refit,
sensitivity tables, save/load and ONNX export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.decompose import DecomposeConfig, SensitivityTable, compute_sensitivity, decompose
from prunekit.errors import PruningError
from prunekit.measure import count_flops, count_params
from prunekit.plan import Replace


class Net(nn.Module):
    """conv(3->24) -> BN -> ReLU -> conv(24->32, stride 2) -> ReLU -> conv(32->32) -> pool -> fc."""

    def __init__(self, seed: int = 0, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(24)
        self.down = nn.Conv2d(24, width, 3, stride=2, padding=1)
        self.body = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.down(x))
        x = self.body(x)
        return self.fc(x.mean((2, 3)))


def _net(seed: int = 0) -> Net:
    net = Net(seed).double().eval()
    with torch.no_grad():  # non-trivial BN statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def _x(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _svd_weight(w: torch.Tensor, rank: int, mode: str) -> torch.Tensor:
    """The rank-``rank`` SVD approximation of the weight reshaped as the mode says, by numpy."""
    a = w.detach().numpy()
    if a.ndim == 2:
        m = a
    elif mode == "channel":
        m = a.reshape(a.shape[0], -1)
    else:
        n, c, kh, kw = a.shape
        m = a.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
    if a.ndim == 2 or mode == "channel":
        return torch.from_numpy(approx.reshape(a.shape))
    n, c, kh, kw = a.shape
    return torch.from_numpy(approx.reshape(c, kh, n, kw).transpose(2, 0, 1, 3).copy())


def _with_weights(model: nn.Module, ranks: dict[str, int], mode: str) -> nn.Module:
    """The oracle: ``model`` with each named layer's weight replaced by its rank-r SVD approximation."""
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for name, r in ranks.items():
            layer = oracle.get_submodule(name)
            layer.weight.copy_(_svd_weight(layer.weight, r, mode))
    return oracle


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_full_rank_computes_the_original(mode: str) -> None:
    model, x = _net(), _x()
    full = 10_000  # clipped to each layer's full rank
    small, plan = decompose(model, x, mode=mode, ranks=full, skip_unprofitable=False)
    names = ["stem", "down", "body", "fc"] if mode == "channel" else ["stem", "down", "body"]
    assert [s.module for s in plan.steps] == names and all(isinstance(s, Replace) for s in plan.steps)
    assert all(isinstance(small.get_submodule(n), nn.Sequential) for n in names)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_rank_r_equals_numpy_svd_approximation(mode: str) -> None:
    model, x = _net(), _x()
    ranks = {"stem": 5, "down": 4, "body": 3} | ({"fc": 2} if mode == "channel" else {})
    small, plan = decompose(model, x, mode=mode, ranks=ranks)
    assert plan.meta["decompose"]["ranks"] == ranks
    for name, r in ranks.items():
        assert small.get_submodule(name)[0].weight.shape[0] == r  # the bottleneck width is the rank
    oracle = _with_weights(model, ranks, mode)
    torch.testing.assert_close(small(x), oracle(x), rtol=1e-7, atol=1e-9)
    assert (small(x) - model(x)).abs().max() > 1e-3  # the oracle can fail: these ranks are approximations


def _known_spectrum(sigma: list[float], n: int = 16, c: int = 4, k: int = 3, seed: int = 0) -> nn.Conv2d:
    """A conv whose N x (C k k) weight matrix has exactly the singular values ``sigma`` (padded with zeros)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(c * k * k, n, generator=g, dtype=torch.float64))
    s = torch.tensor(sigma + [0.0] * (n - len(sigma)), dtype=torch.float64)
    conv = nn.Conv2d(c, n, k, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(((u * s) @ v.T).reshape(n, c, k, k))
    return conv


def test_energy_and_threshold_rules_on_known_singular_values() -> None:
    # energies 16, 4, 1, 0.25, 12 x 0.01: total 21.37; cumulative 0.749, 0.936, 0.983, 0.994, ...
    sigma = [4.0, 2.0, 1.0, 0.5] + [0.1] * 12
    model = nn.Sequential(_known_spectrum(sigma)).eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    for rule, want in [({"energy": 0.9}, 2), ({"energy": 0.95}, 3), ({"energy": 0.7}, 1),
                       ({"threshold": 0.3}, 4), ({"threshold": 1.5}, 2), ({"threshold": 0.09}, 16)]:
        _, plan = decompose(model, x, skip_unprofitable=False, **rule)
        assert plan.meta["decompose"]["ranks"] == {"0": want}, rule
    _, plan = decompose(model, x, energy=0.9, round_to=4)
    assert plan.meta["decompose"]["ranks"] == {"0": 4}  # rank 2 rounded up to a multiple of 4


def test_a_layer_factorisation_would_not_speed_up_is_left_alone() -> None:
    model, x = _net(), _x()
    # body: 32 x 288 matrix, a factorised pair costs 288 + 32 per rank against 9216: profitable below rank 29.
    small, plan = decompose(model, x, ranks={"body": 28})
    assert plan.meta["decompose"]["ranks"] == {"body": 28}
    small, plan = decompose(model, x, ranks={"body": 29})
    assert not plan.steps and "would not reduce FLOPs" in plan.meta["decompose"]["left_alone"]["body"]
    assert count_flops(small, x) == count_flops(model, x)


@pytest.mark.parametrize("mode,target", [("channel", 0.5), ("spatial", 0.4), ("channel", 0.75)])
def test_target_flops_lands_within_two_percent(mode: str, target: float) -> None:
    model, x = _net(), _x(1)
    small, plan = decompose(model, x, mode=mode, target_flops=target)
    got = count_flops(small, x) / count_flops(model, x)
    assert got <= target * 1.02 and abs(got - target) <= 0.02 * target, got
    assert plan.meta["decompose"]["target"]["achieved"] == pytest.approx(got)
    oracle = _with_weights(model, plan.meta["decompose"]["ranks"], mode)
    torch.testing.assert_close(small(x), oracle(x), rtol=1e-7, atol=1e-9)


def test_target_params_and_round_to() -> None:
    model, x = _net(), _x(1)
    small, plan = decompose(model, x, target_params=0.6, round_to=2)
    got = count_params(small) / count_params(model)
    assert abs(got - 0.6) <= 0.02 * 0.6 and got <= 0.6
    assert all(r % 2 == 0 for r in plan.meta["decompose"]["ranks"].values())


def test_budget_goes_first_to_a_layer_that_is_exactly_low_rank() -> None:
    """The greedy allocation trades error for FLOPs: a layer of exact rank 3 is cut first, for free."""
    model, x = _net(), _x(1)
    with torch.no_grad():
        model.body.weight.copy_(_svd_weight(model.body.weight, 3, "channel"))
    # Cutting body to rank 3 saves 9216 - 3 * 320 of its 9216 FLOPs per position: enough for 0.8.
    small, plan = decompose(model, x, target_flops=0.8)
    ranks = plan.meta["decompose"]["ranks"]
    assert set(ranks) == {"body"} and ranks["body"] >= 3
    torch.testing.assert_close(small(x), model(x), rtol=1e-7, atol=1e-9)  # nothing was lost


def test_the_users_model_is_never_modified() -> None:
    model, x = _net(), _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    decompose(model, x, target_flops=0.5, refit_loader=[(x, None)])
    assert model.training and isinstance(model.body, nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.body._forward_hooks and not model.body._forward_pre_hooks


def test_refit_lowers_the_calibration_error() -> None:
    model = _net()
    calib = [(_x(8, seed=s), None) for s in (2, 3)]
    plain, _ = decompose(model, calib[0][0], mode="spatial", ranks=2)
    refit, plan = decompose(model, calib[0][0], mode="spatial", ranks=2, refit_loader=calib)
    assert plan.meta["decompose"]["refitted"] == ["stem", "down", "body"]
    with torch.no_grad():
        ref = [model(x) for x, _ in calib]

        def err(m: nn.Module) -> float:
            return sum(float((m(x) - y).square().sum()) for (x, _), y in zip(calib, ref))

        # The layer the refit changed last: its output error against the original layer, on the same input.
        e_plain, e_refit = err(plain), err(refit)
    assert e_refit < 0.9 * e_plain, (e_refit, e_plain)
    # Only the second factors change; the first factors are the SVD's.
    for name in ("stem", "down", "body"):
        assert torch.equal(refit.get_submodule(name)[0].weight, plain.get_submodule(name)[0].weight)
        assert not torch.equal(refit.get_submodule(name)[1].weight, plain.get_submodule(name)[1].weight)


def test_refit_of_one_layer_is_the_least_squares_solution() -> None:
    """Oracle: numpy's lstsq of the original layer's outputs on the first factor's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)).double().eval()
    x = torch.randn(64, 12, dtype=torch.float64)
    small, _ = decompose(model, x, ranks={"0": 3}, refit_loader=[(x, None)])
    first = small[0][0]
    z = torch.cat([first(x), torch.ones(64, 1, dtype=torch.float64)], 1).detach().numpy()
    y = model[0](x).detach().numpy()
    sol = np.linalg.lstsq(z, y, rcond=None)[0]
    np.testing.assert_allclose(small[0][1].weight.detach().numpy(), sol[:-1].T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(small[0][1].bias.detach().numpy(), sol[-1], rtol=1e-4, atol=1e-6)


def test_sensitivity_table_is_measured_saved_and_reused(tmp_path: Path) -> None:
    model, x = _net(), _x(1)
    calib = [(_x(4, seed=5), None)]
    table = compute_sensitivity(model, x, calib, mode="channel", candidates=(0.25, 0.5))
    row = table.layers["body"]
    assert row.full_rank == 32 and row.ranks == [1, 8, 16]
    # Oracle for one entry: the relative output error with only body at rank 8, computed directly.
    oracle = _with_weights(model, {"body": 8}, "channel")
    with torch.no_grad():
        y0, y = model(calib[0][0]), oracle(calib[0][0])
    want = float((y - y0).square().sum() / y0.square().sum())
    assert row.errors[1] == pytest.approx(want, rel=1e-6)
    assert row.errors[0] > row.errors[1] > row.errors[2] > 0
    assert table.error("body", 12) == pytest.approx((row.errors[1] + row.errors[2]) / 2)  # interpolated
    assert table.error("body", 32) == 0.0

    path = tmp_path / "sens.json"
    _, plan = decompose(model, x, target_flops=0.5, allocation="aimet", sensitivity=path, calib_loader=calib,
                        candidates=(0.25, 0.5))
    assert json.loads(path.read_text())["format"] == "prunekit.rank_sensitivity/1"
    saved = SensitivityTable.load(path)
    assert saved.layers["body"].errors == pytest.approx(row.errors)
    ranks = plan.meta["decompose"]["ranks"]
    assert all(r in saved.layers[n].ranks for n, r in ranks.items())  # AIMET picks measured candidates
    assert plan.meta["decompose"]["flops"]["fraction"] <= 0.5
    # Reused without data: the same allocation.
    _, again = decompose(model, x, target_flops=0.5, allocation="aimet", sensitivity=path)
    assert again.meta["decompose"]["ranks"] == ranks
    # The greedy on the table's interpolated errors lands on the budget.
    small, plan = decompose(model, x, target_flops=0.5, allocation="table", sensitivity=saved)
    assert abs(count_flops(small, x) / count_flops(model, x) - 0.5) <= 0.01
    with pytest.raises(PruningError, match="mode 'channel', not 'spatial'"):
        decompose(model, x, mode="spatial", target_flops=0.5, allocation="table", sensitivity=saved)


def test_save_load_and_onnx_export(tmp_path: Path) -> None:
    model, x = _net().float(), _x().float()
    small, plan = decompose(model, x, mode="spatial", target_flops=0.5)
    pk.save(small, plan, tmp_path / "run")
    text = (tmp_path / "run" / "plan.json").read_text()
    assert "pickle" not in text and json.loads(text)["format"] == "prunekit.plan/2"
    loaded = pk.load(tmp_path / "run", lambda: Net(seed=7)).eval()  # other weights: all must come from the file
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'prunekit[export]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'prunekit[export]')")
    from prunekit.export import export_onnx

    fig = export_onnx(small, x, tmp_path / "m.onnx")
    assert fig["match"]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, small(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_bad_options_name_the_option() -> None:
    model, x = _net(), _x()
    with pytest.raises(PruningError, match="exactly one of"):
        decompose(model, x, energy=0.9, target_flops=0.5)
    with pytest.raises(PruningError, match="exactly one of"):
        decompose(model, x)
    with pytest.raises(PruningError, match="mode="):
        decompose(model, x, mode="tucker", energy=0.9)
    with pytest.raises(PruningError, match="energy="):
        DecomposeConfig(energy=1.5)
    with pytest.raises(PruningError, match="'nope'"):
        decompose(model, x, ranks={"nope": 2})
    with pytest.raises(PruningError, match="'bn'"):
        decompose(model, x, ranks={"bn": 2})
    with pytest.raises(PruningError, match="unknown option 'enrgy'"):
        decompose(model, x, enrgy=0.9)
    with pytest.raises(PruningError, match="target_flops=0.01"):
        decompose(model, x, target_flops=0.01)
    with pytest.raises(PruningError, match="sensitivity table"):
        decompose(model, x, target_flops=0.5, allocation="aimet")
    small, plan = decompose(model, x, energy=0.9, ignore=[model.body, "fc"])
    assert plan.meta["decompose"]["left_alone"]["body"] == "ignored" and "fc" not in plan.meta["decompose"]["ranks"]


def test_svd_method_from_the_registry() -> None:
    from prunekit import methods

    model, x = _net(), _x(1)
    calib = [(_x(4, seed=5), None)]
    res = methods.get("svd")(model, x, loader=calib, target_flops=0.5, mode="spatial", refit=True, ignore=["stem"])
    assert "stem" not in res.plan.meta["decompose"]["ranks"] and res.info["refitted"]
    assert abs(count_flops(res.model, x) / count_flops(model, x) - 0.5) <= 0.01
    with pytest.raises(PruningError, match="target_flops / target_params, energy= or threshold="):
        methods.get("svd")(model, x)
