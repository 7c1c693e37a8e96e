"""Tests for prunekit.recover: training loop, resume, checkpoints, distillation, evaluation."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunekit.recover import (
    TrainConfig,
    atomic_torch_save,
    distillation_loss,
    evaluate,
    kd_kl,
    load_checkpoint,
    train,
)
from prunekit.zoo.data import load_dataset, make_loader

TIMING_KEYS = {"seconds", "images_per_s"}


def _blobs(n: int = 240, seed: int = 0) -> TensorDataset:
    """Three well-separated Gaussian blobs in 2-D (a linearly separable 3-class problem)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0.0], [-2.0, 3.5], [-2.0, -3.5]])
    y = torch.arange(n) % 3
    x = centres[y] + 0.5 * torch.randn(n, 2, generator=g)
    return TensorDataset(x, y)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))


def _small_cnn(seed: int = 0) -> nn.Module:
    """Conv + BN + dropout: exercises buffers and RNG-dependent layers in the resume test."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10),
    )


def _strip_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def test_tiny_model_learns_separable_problem() -> None:
    ds = _blobs()
    loader = make_loader(ds, batch_size=32, shuffle=True, seed=0)
    model = _mlp()
    before = evaluate(model, DataLoader(ds, batch_size=64))
    cfg = TrainConfig(epochs=8, lr=0.1, weight_decay=0.0, schedule="cosine", warmup_epochs=1)
    res = train(model, loader, cfg, val_loader=DataLoader(ds, batch_size=64), progress=False)
    losses = [r["train_loss"] for r in res.history]
    assert len(res.history) == 8 and res.epochs_completed == 8 and res.global_step == 8 * len(loader)
    assert losses[-1] < 0.3 * losses[0]
    assert res.final["val_top1"] >= 0.97 and before["top1"] < 0.7
    assert res.final["train_acc"] >= 0.95 and res.images_per_s > 0 and res.wall_time_s > 0


def _resume_setup() -> tuple[TrainConfig, object]:
    info = load_dataset("digits", subset=160, image_size=8, augment=True, seed=0)
    cfg = TrainConfig(
        epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=0.5,
        label_smoothing=0.1, max_steps_per_epoch=4, seed=7, grad_clip=5.0,
    )
    return cfg, info


def test_resume_is_exact(tmp_path: Path) -> None:
    cfg, info = _resume_setup()
    steps = cfg.max_steps_per_epoch

    straight = _small_cnn()
    res_a = train(straight, make_loader(info, batch_size=16, shuffle=True, seed=3), cfg, progress=False)

    def stop_in_second_epoch(model: nn.Module, step: int) -> None:
        if step == steps + 2:
            raise KeyboardInterrupt

    interrupted = _small_cnn()
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, make_loader(info, batch_size=16, shuffle=True, seed=3), cfg, run_dir=tmp_path,
              progress=False, hooks=[stop_in_second_epoch])
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == steps
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 1

    resumed = _small_cnn(seed=123)  # different init: everything must come from the checkpoint
    res_c = train(resumed, make_loader(info, batch_size=16, shuffle=True, seed=3), cfg, run_dir=tmp_path,
                  resume=True, progress=False)
    assert res_c.resumed_from_epoch == 1 and res_c.global_step == 2 * steps
    sa, sc = straight.state_dict(), resumed.state_dict()
    for k in sa:
        assert torch.allclose(sa[k].float(), sc[k].float(), rtol=0, atol=1e-6), k
        assert torch.equal(sa[k], sc[k]), k  # bitwise on CPU
    assert _strip_timing(res_a.history) == _strip_timing(res_c.history)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_resume_without_restoring_rng_would_differ(tmp_path: Path) -> None:
    """Guards the exactness test: a fresh 1-epoch run from the epoch-1 weights alone differs."""
    cfg, info = _resume_setup()
    straight = _small_cnn()
    train(straight, make_loader(info, batch_size=16, shuffle=True, seed=3), cfg, progress=False)
    half = _small_cnn()
    cfg1 = dataclasses.replace(cfg, epochs=1)
    train(half, make_loader(info, batch_size=16, shuffle=True, seed=3), cfg1, progress=False)
    # Continue from the weights only (new optimizer, schedule and RNG): not the same run.
    train(half, make_loader(info, batch_size=16, shuffle=True, seed=3), cfg1, progress=False)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(straight.state_dict().values(), half.state_dict().values()))
    assert diff > 1e-4


def test_checkpoint_and_log_files(tmp_path: Path) -> None:
    ds = _blobs(90)
    cfg = TrainConfig(epochs=3, lr=0.1, schedule="constant")
    train(_mlp(), make_loader(ds, batch_size=30, shuffle=True, seed=0), cfg,
          val_loader=DataLoader(ds, batch_size=45), run_dir=tmp_path, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names in (["checkpoint.pt", "train_log.jsonl"], ["checkpoint.pt", "tb", "train_log.jsonl"])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain, safe-to-load contents
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 9 and len(ckpt["history"]) == 3
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "rng", "loader_generator", "history", "config"}
    fresh = _mlp(seed=5)
    fresh.load_state_dict(ckpt["model"])
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for key in ("lr", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "seconds", "images_per_s"):
        assert all(key in r for r in lines), key


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"v": torch.tensor([1.0])}, path)
    real_save = torch.save

    def broken_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"v": torch.tensor([2.0])}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    assert torch.load(path, weights_only=True)["v"].item() == 1.0
    atomic_torch_save({"v": torch.tensor([3.0])}, path)
    assert torch.load(path, weights_only=True)["v"].item() == 3.0
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_kd_loss_against_hand_computation() -> None:
    torch.manual_seed(0)
    student = nn.Linear(5, 4).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    logits = student(x)
    zs = logits.detach().numpy()
    ce_hand = -np.mean(_np_log_softmax(zs)[np.arange(6), y.numpy()])
    # Teacher == student (same weights): KL is 0, so the total is exactly the CE part.
    teacher = copy.deepcopy(student)
    total, ce, kd = distillation_loss(logits, y, teacher(x), alpha=0.7, temperature=3.0)
    assert math.isclose(ce.item(), ce_hand, rel_tol=1e-6)
    assert abs(kd.item()) < 1e-6
    assert math.isclose(total.item(), 0.3 * ce_hand, rel_tol=1e-6)
    # A different teacher: KD term = T^2 * mean_i sum_c p_t log(p_t / p_s) at temperature T.
    zt = zs[::-1].copy() * 1.5
    t = 3.0
    lp_s, lp_t = _np_log_softmax(zs / t), _np_log_softmax(zt / t)
    kd_hand = t * t * np.mean(np.sum(np.exp(lp_t) * (lp_t - lp_s), axis=1))
    assert math.isclose(kd_kl(logits, torch.from_numpy(zt), t).item(), kd_hand, rel_tol=1e-5)
    total2, _, _ = distillation_loss(logits, y, torch.from_numpy(zt), alpha=0.25, temperature=t)
    assert math.isclose(total2.item(), 0.75 * ce_hand + 0.25 * kd_hand, rel_tol=1e-5)


def test_training_with_teacher_follows_the_teacher() -> None:
    ds = _blobs(180)
    teacher = _mlp(seed=1)
    # Train the teacher on permuted labels so that following it differs from following y.
    perm = torch.tensor([2, 0, 1])
    tds = TensorDataset(ds.tensors[0], perm[ds.tensors[1]])
    train(teacher, make_loader(tds, batch_size=30, shuffle=True, seed=0), TrainConfig(epochs=6, lr=0.1), progress=False)
    frozen = copy.deepcopy(teacher.state_dict())
    student = _mlp(seed=2)
    cfg = TrainConfig(epochs=6, lr=0.1, kd_alpha=1.0, kd_temperature=2.0)
    res = train(student, make_loader(ds, batch_size=30, shuffle=True, seed=0), cfg, teacher=teacher, progress=False)
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    assert math.isfinite(res.final["train_loss"])
    x = ds.tensors[0]
    with torch.no_grad():
        agree = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
        label_acc = (student(x).argmax(1) == ds.tensors[1]).float().mean().item()
    assert agree > 0.95 and label_acc < 0.1


def test_evaluate_against_hand_count() -> None:
    model = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(6))  # logits == inputs
    # Each row: the true class (label 0) placed at a chosen rank among 6 classes.
    ranks = [0, 0, 0, 1, 2, 4, 5, 0, 3, 5]
    rows = []
    for r in ranks:
        scores = [10.0 - i for i in range(6)]  # descending, no ties
        row = [0.0] * 6
        others = iter(range(1, 6))
        for pos, s in enumerate(scores):
            row[0 if pos == r else next(others)] = s
        rows.append(row)
    x = torch.tensor(rows)
    y = torch.zeros(len(rows), dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    out = evaluate(model, loader, topk=(1, 5, 10))
    assert out["top1"] == pytest.approx(4 / 10)  # ranks == 0: four rows
    assert out["top5"] == pytest.approx(8 / 10)  # ranks < 5: all but the two 5s
    assert out["top10"] == pytest.approx(1.0)  # capped at 6 classes
    ce = [-(s_true - math.log(sum(math.exp(10.0 - i) for i in range(6)))) for s_true in (10.0 - r for r in ranks)]
    assert out["loss"] == pytest.approx(sum(ce) / 10, rel=1e-5)
    assert out["images"] == 10 and out["images_per_s"] > 0
    assert model.training  # mode restored


def test_hooks_and_extra_loss() -> None:
    ds = _blobs(90)
    seen: list[int] = []
    cfg = TrainConfig(epochs=2, lr=0.1, weight_decay=0.0, schedule="constant")
    plain = _mlp()
    train(plain, make_loader(ds, batch_size=30, shuffle=True, seed=0), cfg, progress=False)

    def l2(model: nn.Module) -> torch.Tensor:
        return 5.0 * sum((p * p).sum() for p in model.parameters())

    reg = _mlp()
    res = train(reg, make_loader(ds, batch_size=30, shuffle=True, seed=0), cfg, progress=False,
                hooks=[lambda m, step: seen.append(step)], loss_fn_extra=l2)
    assert seen == list(range(1, 7))
    assert "train_extra_loss" in res.final
    norm = lambda m: sum((p * p).sum().item() for p in m.parameters())  # noqa: E731
    assert norm(reg) < 0.5 * norm(plain)


def test_lr_schedules_match_hand_values() -> None:
    ds = _blobs(40)
    loader = make_loader(ds, batch_size=10, shuffle=False, seed=0)  # 4 steps per epoch
    step = train(_mlp(), loader, TrainConfig(epochs=4, lr=0.1, schedule="step", milestones=(2, 3), gamma=0.1), progress=False)
    assert [r["lr"] for r in step.history] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    cos = train(_mlp(), loader, TrainConfig(epochs=4, lr=0.2, schedule="cosine"), progress=False)
    assert [r["lr"] for r in cos.history] == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    warm = train(_mlp(), loader, TrainConfig(epochs=2, lr=0.2, schedule="constant", warmup_epochs=1), progress=False)
    assert [r["lr"] for r in warm.history] == pytest.approx([0.2 / 4, 0.2])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="poly")
    with pytest.raises(ValueError, match="kd_alpha"):
        TrainConfig(kd_alpha=1.5)
    res = train(_mlp(), make_loader(_blobs(30), batch_size=10, shuffle=True, seed=0),
                TrainConfig(epochs=1, optimizer="adamw", lr=1e-2, weight_decay=0.01), progress=False)
    assert res.epochs_completed == 1


class _OwnLoss(nn.Module):
    """Computes its own loss in training mode, torchvision-detector style: called as
    ``model(images, targets)`` with lists, returns a dict of losses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):  # type: ignore[no-untyped-def]
        out = self.fc(torch.stack(images))
        if not self.training:
            return out
        y = torch.stack([t["y"] for t in targets])
        return {"a": ((out - y) ** 2).mean(), "b": 0.5 * out.abs().mean()}


def test_model_loss_trains_on_the_sum_of_the_models_losses() -> None:
    torch.manual_seed(0)
    model = _OwnLoss()
    images = [torch.randn(3) for _ in range(4)]
    targets = [{"y": torch.randn(2)} for _ in range(4)]
    batches = [(images, targets)]
    # Oracle: one plain SGD step on the summed losses, by hand.
    ref = copy.deepcopy(model)
    losses = ref(images, targets)
    (losses["a"] + losses["b"]).backward()
    with torch.no_grad():
        expected = {n: p - 0.1 * p.grad for n, p in ref.named_parameters()}
    cfg = TrainConfig(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", model_loss=True,
                      tensorboard=False)
    result = train(model, batches, cfg, progress=False)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n])
    assert result.final["train_loss"] == pytest.approx(float(losses["a"] + losses["b"]), rel=1e-6)
    with pytest.raises(ValueError, match="model_loss"):
        train(model, batches, cfg, val_loader=batches, progress=False)
