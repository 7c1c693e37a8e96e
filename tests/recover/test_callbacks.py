"""Tests for the Callback protocol of prunekit.recover.train: param groups, extra losses,
call order, stateful resume (in-process and after a SIGKILL) and UCP's use of it."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from prunekit.errors import PruningError
from prunekit.recover import Callback, TrainConfig, load_checkpoint, train
from prunekit.zoo.data import make_loader

TIMING_KEYS = {"seconds", "images_per_s"}


def _batch(n: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.randint(0, 3, (n,), generator=g)


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(2, 3)


def _ce_grads(lin: nn.Linear, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Hand gradient of the mean cross-entropy of a linear layer: dL/dz = (softmax(z) - onehot(y)) / N."""
    with torch.no_grad():
        z = x @ lin.weight.T + lin.bias
        dz = (torch.softmax(z, 1) - F.one_hot(y, z.shape[1]).to(z.dtype)) / x.shape[0]
        return dz.T @ x, dz.sum(0)


class WeightPull(Callback):
    """Extra loss ``c * ||W||^2`` on the model's weight."""

    def __init__(self, c: float) -> None:
        self.c = c

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        return self.c * model.weight.square().sum()


class Outside(Callback):
    """A parameter kept outside the model, trained through an added param group on ``0.5 ||p||^2``."""

    def __init__(self) -> None:
        self.p = nn.Parameter(torch.tensor([3.0, -4.0]))
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        optimizer.add_param_group({"params": [self.p]})

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        return 0.5 * self.p.square().sum()


def test_extra_loss_matches_a_hand_computed_sgd_step() -> None:
    x, y = _batch()
    lin = _linear()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    g_w, g_b = _ce_grads(lin, x, y)
    c, lr = 0.3, 0.5
    cfg = TrainConfig(epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant", tensorboard=False)
    # The callback's term and the loss_fn_extra adapter's term are both added.
    res = train(lin, [(x, y)], cfg, progress=False, callbacks=[WeightPull(c)],
                loss_fn_extra=lambda m: 0.2 * m.bias.sum())
    torch.testing.assert_close(lin.weight.detach(), w0 - lr * (g_w + 2 * c * w0), rtol=0, atol=1e-6)
    torch.testing.assert_close(lin.bias.detach(), b0 - lr * (g_b + 0.2), rtol=0, atol=1e-6)
    expected_extra = c * w0.square().sum().item() + 0.2 * b0.sum().item()
    assert res.final["train_extra_loss"] == pytest.approx(expected_extra, rel=1e-6)


def test_added_param_group_is_trained_scheduled_and_clipped() -> None:
    x, y = _batch()
    lin = _linear()
    w0 = lin.weight.detach().clone()
    g_w, g_b = _ce_grads(lin, x, y)
    cb = Outside()
    p0 = cb.p.detach().clone()  # d(0.5 ||p||^2)/dp = p
    lr, clip = 0.5, 1.0
    cfg = TrainConfig(epochs=1, lr=lr, momentum=0.9, weight_decay=0.0, schedule="cosine", grad_clip=clip,
                      tensorboard=False)
    train(lin, [(x, y)], cfg, progress=False, callbacks=[cb])
    # One clip over every group: the norm includes the outside parameter's gradient.
    norm = torch.sqrt(g_w.square().sum() + g_b.square().sum() + p0.square().sum())
    coef = clip / (norm + 1e-6)
    torch.testing.assert_close(cb.p.detach(), p0 - lr * coef * p0, rtol=0, atol=1e-6)
    torch.testing.assert_close(lin.weight.detach(), w0 - lr * coef * g_w, rtol=0, atol=1e-6)
    opt = cb.optimizer
    assert opt is not None and len(opt.param_groups) == 2
    torch.testing.assert_close(opt.state[cb.p]["momentum_buffer"], coef * p0, rtol=0, atol=1e-6)
    # Built after on_train_start, the cosine schedule also drove the added group to 0 after its only step.
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


class Recorder(Callback):
    """Logs every call, to check the order the loop promises."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # The LR scheduler sets "initial_lr" on every group it covers: not built yet here.
        self.events.append(("start", "initial_lr" in optimizer.param_groups[0]))

    def on_batch_start(self, model: nn.Module, step: int) -> None:
        self.events.append(("batch", step, model.training))

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        self.events.append(("extra", tuple(batch[0].shape)))
        return None

    def on_step(self, model: nn.Module, step: int) -> None:
        self.events.append(("step", step))

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        self.events.append(("epoch", epoch, record["step"]))
        record["marker"] = 10 * epoch

    def on_train_end(self, model: nn.Module) -> None:
        self.events.append(("end",))


def test_call_order_and_record_keys() -> None:
    x, y = _batch(6)
    rec = Recorder()
    res = train(_linear(), [(x[:3], y[:3]), (x[3:], y[3:])], TrainConfig(epochs=2, lr=0.1, tensorboard=False),
                progress=False, callbacks=[rec])
    step = lambda k: [("batch", k, True), ("extra", (3, 2)), ("step", k)]  # noqa: E731
    assert rec.events == [("start", False), *step(1), *step(2), ("epoch", 1, 2), *step(3), *step(4),
                          ("epoch", 2, 4), ("end",)]
    assert [r["marker"] for r in res.history] == [10, 20]
    assert "train_extra_loss" not in res.final  # every extra_loss returned None


def _blobs(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-1.5, 2.5], [-1.5, -2.5]])
    y = torch.arange(n) % 3
    return TensorDataset(centres[y] + 0.8 * torch.randn(n, 2, generator=g), y)


class Annealed(Callback):
    """A temperature decaying by 0.9 per step that weights the extra loss (so the schedule shapes
    the weights), and an outside parameter whose value only the callback's state holds."""

    def __init__(self) -> None:
        self.temperature = 1.0
        self.offset = nn.Parameter(torch.zeros(3))

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.add_param_group({"params": [self.offset]})

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        return self.temperature * (0.05 * model[0].weight.square().sum() + (self.offset - 1).square().sum())

    def on_step(self, model: nn.Module, step: int) -> None:
        self.temperature *= 0.9

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        record["temperature"] = self.temperature

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "offset": self.offset.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.temperature = state["temperature"]
        with torch.no_grad():  # in place: the optimizer holds this very Parameter
            self.offset.copy_(state["offset"])


def resume_problem(seed: int = 0) -> tuple[nn.Module, Any, TrainConfig]:
    """Model (with dropout: the RNG matters), shuffling loader and config of the resume tests;
    also imported by the killed subprocess."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 3))
    cfg = TrainConfig(epochs=4, lr=0.1, momentum=0.9, weight_decay=1e-3, schedule="cosine", max_steps_per_epoch=3,
                      grad_clip=1.0, seed=5, tensorboard=False)
    return model, make_loader(_blobs(), batch_size=16, shuffle=True, seed=3), cfg


def _uninterrupted() -> tuple[nn.Module, Annealed, list[dict]]:
    model, loader, cfg = resume_problem()
    cb = Annealed()
    res = train(model, loader, cfg, progress=False, callbacks=[cb])
    return model, cb, res.history


def _strip_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def _assert_same_run(model: nn.Module, cb: Annealed, history: list[dict],
                     ref: tuple[nn.Module, Annealed, list[dict]]) -> None:
    ref_model, ref_cb, ref_history = ref
    for (k, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), k  # bitwise on CPU
    assert torch.equal(cb.offset.detach(), ref_cb.offset.detach())
    assert cb.temperature == ref_cb.temperature == pytest.approx(0.9 ** 12)
    assert _strip_timing(history) == _strip_timing(ref_history)
    assert [r["temperature"] for r in history] == pytest.approx([0.9 ** (3 * e) for e in (1, 2, 3, 4)])


def test_resume_restores_callback_state(tmp_path: Path) -> None:
    ref = _uninterrupted()
    model, loader, cfg = resume_problem()

    def stop_in_third_epoch(m: nn.Module, step: int) -> None:
        if step == 2 * cfg.max_steps_per_epoch + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, loader, cfg, run_dir=tmp_path, progress=False, callbacks=[Annealed()], hooks=[stop_in_third_epoch])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2
    fresh, loader, cfg = resume_problem(seed=1)  # other init: everything must come from the checkpoint
    cb = Annealed()
    res = train(fresh, loader, cfg, run_dir=tmp_path, resume=True, progress=False, callbacks=[cb])
    assert res.resumed_from_epoch == 2
    _assert_same_run(fresh, cb, res.history, ref)


_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_callbacks import Annealed, resume_problem
from prunekit.recover import train

run_dir, marker = Path(sys.argv[2]), Path(sys.argv[3])
model, loader, cfg = resume_problem()

def park(model, step):
    # One step into epoch 3: the epoch-2 checkpoint is on disk and memory is ahead of it.
    if step == 2 * cfg.max_steps_per_epoch + 1:
        marker.write_text("parked")
        time.sleep(300)

train(model, loader, cfg, run_dir=run_dir, progress=False, callbacks=[Annealed()], hooks=[park])
"""


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "parked"
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(Path(__file__).parent), str(run_dir), str(marker)],
                                 stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            assert time.monotonic() < deadline, "the training subprocess did not reach epoch 3"
            time.sleep(0.02)
        ref = _uninterrupted()  # computed while the child waits to be killed
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2
    fresh, loader, cfg = resume_problem(seed=1)
    cb = Annealed()
    res = train(fresh, loader, cfg, run_dir=run_dir, resume=True, progress=False, callbacks=[cb])
    assert res.resumed_from_epoch == 2
    _assert_same_run(fresh, cb, res.history, ref)


def test_resume_with_another_number_of_callbacks_raises(tmp_path: Path) -> None:
    model, loader, cfg = resume_problem()
    one = dataclasses.replace(cfg, epochs=1)
    train(model, loader, one, run_dir=tmp_path, progress=False, callbacks=[Annealed()])
    fresh, loader, _ = resume_problem(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="states of 1 callbacks but 2 callbacks were passed"):
        train(fresh, loader, cfg, run_dir=tmp_path, resume=True, progress=False, callbacks=[Annealed(), Annealed()])
    with pytest.raises(ValueError, match="states of 1 callbacks but 0 callbacks"):
        train(fresh, loader, cfg, run_dir=tmp_path, resume=True, progress=False)
    # Refused before anything was restored into the model.
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_ucp_attention_trains_through_callbacks() -> None:
    """UCP's attention training runs in train(): the SE gates' blocks (submodules attached
    after the network was frozen) learn, network parameters that do not require gradients stay, BatchNorm statistics follow the scaled
    inputs (the network trains in train mode, as in the paper), and target-less batches are
    labelled by the network itself."""
    import prunekit as pk
    from prunekit.gates import attach_gates
    from prunekit.methods.ucp import train_attention

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4))
    example = torch.randn(1, 3, 6, 6)
    graph = pk.trace(model, example)
    model.requires_grad_(False)
    params = {k for k, _ in model.named_parameters()}  # the network's, before the gates join it
    net_before = {k: v.clone() for k, v in model.state_dict().items()}
    gates = attach_gates(model, graph, kind="se", at="producers", reduction=2)
    blocks = [p for g in gates.gates.values() for p in g.blocks.parameters()]
    assert blocks and all(p.requires_grad for p in blocks)
    att_before = [p.detach().clone() for p in blocks]
    batches = [torch.randn(8, 3, 6, 6) for _ in range(2)]  # inputs only
    loss = train_attention(model, gates, batches, steps=4, lr=0.05, l1=0.1)
    assert loss is not None and loss > 0
    after = model.state_dict()
    assert all(torch.equal(net_before[k], after[k]) for k in params)  # frozen weights stay
    assert not torch.equal(net_before["1.running_mean"], after["1.running_mean"])  # BN trains in train mode
    assert any(not torch.equal(a, p) for a, p in zip(att_before, blocks))
    with pytest.raises(PruningError, match="tensor inputs"):
        train_attention(model, gates, [({"x": batches[0]}, None)], steps=1, lr=0.05, l1=0.1)
    gates.detach()


class GradEdit(Callback):
    """Records the gradient the backward pass left and adds ``c * W`` to it before the step."""

    def __init__(self, c: float) -> None:
        self.c = c
        self.seen: list[tuple[int, Tensor]] = []

    def on_before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.seen.append((step, model.weight.grad.detach().clone()))
        model.weight.grad.add_(model.weight.detach(), alpha=self.c)


def test_on_before_step_edits_the_gradient_after_backward_and_before_clip_and_step() -> None:
    x, y = _batch()
    lin = _linear()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    g_w, g_b = _ce_grads(lin, x, y)
    c, lr = 0.7, 0.5
    cb = GradEdit(c)
    cfg = TrainConfig(epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant", tensorboard=False)
    train(lin, [(x, y)], cfg, progress=False, callbacks=[cb])
    assert [s for s, _ in cb.seen] == [1]
    torch.testing.assert_close(cb.seen[0][1], g_w, rtol=0, atol=1e-6)  # it sees backward's gradient
    torch.testing.assert_close(lin.weight.detach(), w0 - lr * (g_w + c * w0), rtol=0, atol=1e-6)  # the step uses its edit
    torch.testing.assert_close(lin.bias.detach(), b0 - lr * g_b, rtol=0, atol=1e-6)
    # With clipping, the norm is taken of the edited gradient: the edit happens first.
    lin = _linear()
    clip = 0.1
    train(lin, [(x, y)], dataclasses.replace(cfg, grad_clip=clip), progress=False, callbacks=[GradEdit(c)])
    edited = g_w + c * w0
    coef = clip / (torch.sqrt(edited.square().sum() + g_b.square().sum()) + 1e-6)
    torch.testing.assert_close(lin.weight.detach(), w0 - lr * coef * edited, rtol=0, atol=1e-6)


def test_on_before_step_comes_between_extra_loss_and_on_step() -> None:
    class Order(Recorder):
        def on_before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
            self.events.append(("before_step", step, model.weight.grad is not None))

    x, y = _batch(4)
    rec = Order()
    train(_linear(), [(x, y)], TrainConfig(epochs=1, lr=0.1, tensorboard=False), progress=False, callbacks=[rec])
    assert rec.events[1:5] == [("batch", 1, True), ("extra", (4, 2)), ("before_step", 1, True), ("step", 1)]
