"""TRP (Trained Rank Pruning): the sub-gradient and projection against numpy's SVD, one training
step against a hand-computed update, rank removal, budgets and exact resume."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from prunekit import methods
from prunekit.errors import PruningError
from prunekit.measure import count_flops
from prunekit.methods.trp import TRPCallback, low_rank_step
from prunekit.recover import TrainConfig, train
from prunekit.zoo.data import make_loader


def _orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return q


def _energy_rank(s: np.ndarray, energy: float) -> int:
    """By hand: the first r whose cumulative share of sum s^2 reaches ``energy``."""
    share = np.cumsum(s**2) / np.sum(s**2)
    return int(np.argmax(share >= energy - 1e-12)) + 1


def test_subgradient_is_uv_transpose_of_a_matrix_with_known_svd() -> None:
    u, v = _orthonormal(6, 4, 0), _orthonormal(9, 4, 1)
    s = np.array([3.0, 2.0, 0.5, 0.1])  # energies 9, 4, 0.25, 0.01: 0.679, 0.980, ... -> rank 2 at 0.9
    w = torch.from_numpy((u * s) @ v.T)
    approx, sub, r = low_rank_step(w, 0.9)
    assert r == 2
    np.testing.assert_allclose(sub.numpy(), u[:, :2] @ v[:, :2].T, atol=1e-12)
    np.testing.assert_allclose(approx.numpy(), (u[:, :2] * s[:2]) @ v[:, :2].T, atol=1e-12)
    assert low_rank_step(w, 0.99)[2] == 3 and low_rank_step(w, 0.5)[2] == 1


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_the_callback_adds_the_subgradient_of_a_conv_with_known_svd(mode: str) -> None:
    n, c, k = 6, 3, 3
    rows, cols = (n, c * k * k) if mode == "channel" else (c * k, n * k)
    side = min(rows, cols)
    u, v = _orthonormal(rows, side, 2), _orthonormal(cols, side, 3)
    s = np.linspace(2.0, 0.05, side) ** 2
    m = (u * s) @ v.T
    # The weight laid out by hand (independently of the handler's reshape).
    w = m.reshape(n, c, k, k) if mode == "channel" else m.reshape(c, k, n, k).transpose(2, 0, 1, 3)
    model = nn.Sequential(nn.Conv2d(c, n, k, padding=1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    model[0].weight.grad = torch.ones_like(model[0].weight)
    lam = 0.5
    cb = TRPCallback(["0"], mode, energy=0.9, nuclear_weight=lam, project=False)
    cb.on_batch_start(model, 1)
    r = _energy_rank(s, 0.9)
    assert cb.ranks == {"0": r} and 1 < r < side
    cb.on_before_step(model, None, 1)  # type: ignore[arg-type]
    sub = u[:, :r] @ v[:, :r].T
    sub = sub.reshape(n, c, k, k) if mode == "channel" else sub.reshape(c, k, n, k).transpose(2, 0, 1, 3)
    np.testing.assert_allclose(model[0].weight.grad.numpy(), 1.0 + lam * sub, atol=1e-12)
    np.testing.assert_allclose(model[0].weight.detach().numpy(), w)  # project=False: weights untouched


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4))


def _numpy_rank(weight: torch.Tensor, mode: str) -> tuple[np.ndarray, int]:
    a = weight.detach().double().numpy()
    n, c, kh, kw = a.shape
    m = a.reshape(n, -1) if mode == "channel" else a.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)
    return m, int(np.linalg.matrix_rank(m, tol=1e-5 * np.linalg.norm(m, 2)))


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_projection_leaves_exactly_rank_r_weights_every_period(mode: str) -> None:
    model = _net()
    names = ["0", "3", "6"]
    before = {n: _numpy_rank(model.get_submodule(n).weight, mode)[0] for n in names}
    cb = TRPCallback(names, mode, energy=0.8, period=2)
    cb.on_batch_start(model, 1)
    for n in names:
        s = np.linalg.svd(before[n], compute_uv=False)
        r = _energy_rank(s, 0.8)
        got, rank = _numpy_rank(model.get_submodule(n).weight, mode)
        assert rank == r == cb.ranks[n] and r < min(before[n].shape)
        u, s2, vt = np.linalg.svd(before[n], full_matrices=False)
        np.testing.assert_allclose(got, (u[:, :r] * s2[:r]) @ vt[:r], atol=1e-5)
    with torch.no_grad():  # training moves the weights off low rank ...
        for n in names:
            model.get_submodule(n).weight.add_(0.01 * torch.randn_like(model.get_submodule(n).weight))
    noisy = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    cb.on_batch_start(model, 2)  # ... step 2 is not a projection step (period 2)
    assert all(torch.equal(model.get_submodule(n).weight, noisy[n]) for n in names)
    cb.on_batch_start(model, 3)
    assert all(_numpy_rank(model.get_submodule(n).weight, mode)[1] == cb.ranks[n] for n in names)


def test_one_training_step_projects_then_adds_the_subgradient_before_the_update() -> None:
    """Oracle: W' = P(W) - lr * (dL/dW at P(W) + lambda U_r V_r^T), with P the numpy SVD truncation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3)).double()
    x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    lr, lam = 0.1, 0.05
    oracle = copy.deepcopy(model)
    m = oracle[0].weight.detach().numpy().reshape(6, -1)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    r = _energy_rank(s, 0.7)
    projected = ((u[:, :r] * s[:r]) @ vt[:r]).reshape(6, 2, 3, 3)
    with torch.no_grad():
        oracle[0].weight.copy_(torch.from_numpy(projected))
    F.cross_entropy(oracle(x), y).backward()
    want = projected - lr * (oracle[0].weight.grad.numpy() + lam * (u[:, :r] @ vt[:r]).reshape(6, 2, 3, 3))
    cfg = TrainConfig(epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant", tensorboard=False)
    train(model, [(x, y)], cfg, progress=False, callbacks=[TRPCallback(["0"], "channel", energy=0.7, nuclear_weight=lam)])
    np.testing.assert_allclose(model[0].weight.detach().numpy(), want, atol=1e-10)


def _data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def _cfg(epochs: int = 2) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=0.02, seed=3, tensorboard=False)


def test_trp_removes_rank_and_lands_on_a_flops_target() -> None:
    trp = methods.get("trp")
    assert trp.trains is True  # type: ignore[attr-defined]
    model, x = _net(), torch.randn(1, 3, 8, 8)
    loader = make_loader(_data(), batch_size=8, shuffle=True, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = trp(model, x, loader=loader, epochs=2, train_config=_cfg())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    ranks, full = res.info["decompose"]["ranks"], res.info["decompose"]["full_ranks"]
    assert res.info["trained_layers"] == ["0", "3", "6"] and "10" in res.info["decompose"]["left_alone"]
    # Control: the untrained weights keep every singular value above the value threshold 5e-2.
    for name in ("3", "6"):
        s = np.linalg.svd(_numpy_rank(model.get_submodule(name).weight, "channel")[0], compute_uv=False)
        assert (s >= 5e-2).sum() == full[name]
        assert ranks[name] < 0.75 * full[name]  # TRP took a quarter of the rank or more away
    assert len(res.info["rank_trajectory"]) == 2 and res.info["rank_trajectory"][-1] < 1.0
    res = trp(model, x, loader=loader, epochs=2, train_config=_cfg(), mode="VH", target_flops=0.5)
    got = count_flops(res.model, x) / count_flops(model, x)
    assert abs(got - 0.5) <= 0.02 * 0.5 and res.info["flops"]["fraction"] == pytest.approx(got)
    assert all(isinstance(res.model.get_submodule(n), nn.Sequential) for n in res.info["decompose"]["ranks"])
    assert res.model.get_submodule(next(iter(res.info["decompose"]["ranks"])))[0].kernel_size == (3, 1)


class _Interrupting:
    """A loader that raises KeyboardInterrupt at its ``after``-th batch overall (a killed run)."""

    def __init__(self, loader: Any, after: int) -> None:
        self.loader, self.after, self.seen = loader, after, 0
        self.generator = loader.generator  # the training loop saves and restores its state

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.seen += 1
            if self.seen == self.after:
                raise KeyboardInterrupt
            yield batch


def test_resume_after_one_of_two_epochs_is_exact(tmp_path: Path) -> None:
    trp = methods.get("trp")
    x = torch.randn(1, 3, 8, 8)
    kw = dict(epochs=2, train_config=_cfg(), finetune_epochs=1, period=2)

    def loader() -> Any:
        return make_loader(_data(), batch_size=8, shuffle=True, seed=1)

    straight = trp(_net(), x, loader=loader(), run_dir=tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):
        trp(_net(), x, loader=_Interrupting(loader(), 4 + 2), run_dir=tmp_path / "b", **kw)  # in epoch 2 of 2
    resumed = trp(_net(seed=9), x, loader=loader(), run_dir=tmp_path / "b", resume=True, **kw)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise on CPU
    assert straight.info["rank_trajectory"] == resumed.info["rank_trajectory"]
    assert straight.plan.to_dict() == resumed.plan.to_dict()


def test_bad_options_name_the_option() -> None:
    trp = methods.get("trp")
    model, x, data = _net(), torch.randn(1, 3, 8, 8), [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    with pytest.raises(PruningError, match="ND is not implemented"):
        trp(model, x, loader=data, epochs=1, mode="ND")
    with pytest.raises(PruningError, match="pass loader"):
        trp(model, x, epochs=1)
    with pytest.raises(PruningError, match="pass epochs"):
        trp(model, x, loader=data)
    with pytest.raises(PruningError, match="target_latency"):
        trp(model, x, loader=data, epochs=1, target_latency=0.5)
    with pytest.raises(PruningError, match="period"):
        trp(model, x, loader=data, epochs=1, period=0)
    with pytest.raises(PruningError, match="unknown option 'energie'"):
        trp(model, x, loader=data, epochs=1, energie=0.9)
