"""Uniform Channel Pruning with modified squeeze-excitation blocks, UCP (Chang et al. 2020).

  1. attach an SE-style attention block to every prunable group's channels: at its
     normalisation layers (after BN, where a scale is not undone) or else at its producing
     layers; all blocks of one coupled group (e.g. a ResNet stage, shortcut included) share
     the group's channels, so the stage is pruned consistently;
  2. train the attention briefly on the task loss (network frozen by default) with an L1
     pull on the attention values: channels the task does not hold up sink (on ResNet-20 /
     Fashion-MNIST, l1=0.1 gave 80.3% after a short fine-tune against 77.7% with l1=1e-3).
     This runs in :func:`prunekit.recover.train` with a callback that adds the blocks'
     parameters as a param group, adds the L1 term to the loss and keeps the network in eval
     mode (BN statistics stay the trained network's). The optimizer is AdamW with
     ``weight_decay=0`` and a constant LR, the same update as the plain Adam of the earlier
     private loop. Batches without targets are labelled once, before training, with the
     network's own predictions (the blocks start as the identity, so these are the trained
     network's); the earlier loop re-took the argmax of the current output at every step;
  3. the channel's importance is its mean attention over calibration data, summed over the
     group's blocks; remove the lowest under the budget and detach the blocks;
  4. optionally re-initialise the pruned structure to retrain it from scratch (the paper's
     recovery), instead of fine-tuning.

The modification (the paper's exact MSEB is not public): the excitation is ``2 sigmoid(.)``
with a zero-initialised last layer, so every block starts as the identity and the trained
network's function is unchanged until the attention learns.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import prunekit as pk
from prunekit.errors import PruningError
from prunekit.features import as_batch, call_on_device
from prunekit.graph import module_names
from prunekit.graph.dependency import ChannelGroup
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig
from prunekit.recover.train import train
from prunekit.runtime import infer_device


class Excitation(nn.Module):
    """Squeeze (mean over positions) -> FC -> ReLU -> FC -> 2 sigmoid: one scale per channel."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor, channel_dim: int) -> Tensor:
        """Scales of shape ``(batch, channels)`` for activation ``x``."""
        squeezed = x.movedim(channel_dim, -1).reshape(x.shape[0], -1, x.shape[channel_dim]).mean(1)
        return 2 * torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))


def _sites(model: nn.Module, group: ChannelGroup) -> list[tuple[str, nn.Module, np.ndarray, int]]:
    """(module, channel map, channel dim of its output) where the group's attention sits."""
    norms, producers = [], []
    for m in group.members:
        name, _, leaf = m.tensor.rpartition(".")
        mod = model.get_submodule(name) if name else model
        if leaf != "weight":
            continue
        if m.role == "norm" and isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            norms.append((name, mod, m.channel, 1))
        elif m.role == "norm" and isinstance(mod, nn.LayerNorm):
            norms.append((name, mod, m.channel, -1))
        elif m.role == "out" and isinstance(mod, nn.Linear):
            producers.append((name, mod, m.channel, -1))
        elif m.role == "out" and isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
            producers.append((name, mod, m.channel, 1))
    return norms or producers


def _key(module: str) -> str:
    """ModuleDict key of the block at ``module`` (dots are not allowed in keys)."""
    return module.replace(".", "/") or "root"


class Attention:
    """The attached blocks: forward hooks that scale each site's output, and their statistics."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], reduction: int) -> None:
        self.blocks = nn.ModuleDict()
        self.sites: list[tuple[int, str, np.ndarray, int]] = []
        self.handles = []
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.recording = False
        self.last: list[Tensor] = []  # this forward's scales, for the L1 pull
        seen: set[str] = set()
        for g in groups:
            for name, mod, chan, dim in _sites(model, g):
                self.sites.append((g.index, name, chan, dim))
                if name in seen:
                    continue
                seen.add(name)
                key = _key(name)
                self.blocks[key] = Excitation(len(chan), reduction)
                self.handles.append(mod.register_forward_hook(self._hook(key, dim)))
        self.device = infer_device(model)
        self.blocks.to(self.device)

    def _hook(self, key: str, dim: int) -> Any:
        def hook(mod: nn.Module, args: Any, out: Tensor) -> Tensor:
            scale = self.blocks[key](out, dim)  # (batch, channels)
            if self.recording:
                self.sums[key] = self.sums.get(key, 0) + scale.detach().sum(0)
            self.last.append(scale)
            shape = [1] * out.ndim
            shape[0], shape[dim] = out.shape[0], out.shape[dim]
            return out * scale.view(shape)
        return hook

    def remove(self) -> None:
        """Detach every block from the model."""
        for h in self.handles:
            h.remove()

    def scores(self, groups: list[ChannelGroup]) -> list[np.ndarray]:
        """Mean attention per channel of every group, summed over the group's sites."""
        out = {g.index: np.zeros(g.size) for g in groups}
        for gi, name, chan, _ in self.sites:
            key = _key(name)
            mean = (self.sums[key] / max(1, self.count)).double().cpu().numpy()
            ok = chan >= 0
            np.add.at(out[gi], chan[ok], mean[ok])
        return [out[g.index] for g in groups]


class _AttentionTraining(Callback):
    """Training-loop callback that trains the attention blocks of an :class:`Attention`."""

    def __init__(self, att: Attention, l1: float) -> None:
        self.att, self.l1 = att, l1

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Add the blocks' parameters as a param group: they live outside the model (its
        forward hooks call them), so the optimizer built from the model lacks them. The group
        takes the config's options (lr, weight decay 0)."""
        optimizer.add_param_group({"params": list(self.att.blocks.parameters())})

    def on_batch_start(self, model: nn.Module, step: int) -> None:
        """Put the network in eval mode (the loop sets train mode every epoch, which would
        update BN statistics) and clear the scales recorded by the previous forward."""
        model.eval()
        self.att.last = []

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """Return the L1 pull, ``l1`` times the sum over blocks of the mean attention value
        of this forward (None when the model has no block)."""
        if not self.att.last:
            return None
        return self.l1 * sum(s.mean() for s in self.att.last)


def _training_batches(model: nn.Module, source: Iterable[Any], steps: int) -> list[tuple[Tensor, Tensor]]:
    """The ``steps`` batches ``(inputs, targets)`` of the attention training: ``source``'s
    first pass cycled to length ``steps``, targets of target-less batches set to the model's
    predictions. Raises :class:`PruningError` for batches whose inputs or targets are not tensors."""
    first: list[tuple[Tensor, Tensor]] = []
    for x, y in (as_batch(item) for item in itertools.islice(source, steps)):
        if not isinstance(x, Tensor) or not (y is None or isinstance(y, Tensor)):
            raise PruningError("method 'ucp' trains its attention with prunekit.recover.train, which needs loader= "
                               f"batches of (tensor inputs, tensor targets or None); got ({type(x).__name__}, "
                               f"{type(y).__name__})")
        if y is None:
            model.eval()
            with torch.no_grad():
                y = call_on_device(model, x).argmax(1)
        first.append((x, y))
    return list(itertools.islice(itertools.cycle(first), steps))


def train_attention(model: nn.Module, att: Attention, batches: Iterable[Any], *, steps: int, lr: float,
                    l1: float, train_network: bool, seed: int = 0) -> float | None:
    """Train the attention blocks (and the network if ``train_network``) for ``steps``
    batches, cycling through ``batches``, with :func:`prunekit.recover.train`; return the
    mean loss (task + L1) over the steps, or None when ``steps`` is 0."""
    if steps <= 0:
        return None
    data = _training_batches(model, batches, steps)
    cfg = TrainConfig(epochs=1, lr=lr, optimizer="adamw", weight_decay=0.0, schedule="constant", seed=seed,
                      log_every=steps, tensorboard=False)
    final = train(model, data, cfg, progress=False, callbacks=[_AttentionTraining(att, l1)]).final
    return final["train_loss"] + final.get("train_extra_loss", 0.0)


@register("ucp")
def ucp(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None, batches: int = 8,
        steps: int = 100, lr: float = 1e-2, l1: float = 0.1, reduction: int = 4, train_network: bool = False,
        from_scratch: bool = False, seed: int = 0, **kwargs: Any) -> MethodResult:
    """Prune with attention learned by SE-style blocks (UCP) under the budget in ``kwargs``:
    trains the blocks for ``steps`` batches of ``loader`` (the first ``batches`` are the
    calibration set that the importance is averaged over, and the training set unless
    ``train_network``). The user's model is not changed (a copy is trained). With
    ``from_scratch`` the pruned model is re-initialised. Returns the pruned model and its
    plan; ``info["attention_loss"]`` is the mean training loss (task + L1)."""
    import copy

    cfg = budget_config(kwargs, "ucp")
    torch.manual_seed(seed)
    calib = take_batches(loader, batches, "ucp")
    names = module_names(model, list(cfg.ignore), "ignore") if cfg.ignore else None  # module objects -> names of the copy
    work = copy.deepcopy(model)
    work.requires_grad_(train_network)
    graph = pk.trace(work, example_inputs, ignore=names)
    groups = [g for g in graph.groups if g.n_prunable > 0]
    att = Attention(work, groups, reduction)
    try:
        loss = train_attention(work, att, loader if train_network else calib, steps=steps, lr=lr, l1=l1,
                               train_network=train_network, seed=seed)
        work.eval()  # also when steps=0: the importance is measured as the attention was trained, in eval mode
        att.recording = True
        with torch.no_grad():
            for x, _ in calib:
                att.last = []
                call_on_device(work, x)
                att.count += int(x.shape[0]) if isinstance(x, Tensor) else 1
    finally:
        att.remove()
    by_index = dict(zip((g.index for g in groups), att.scores(groups)))
    source = work if train_network else model
    small, plan = pk.prune(source, example_inputs, config=cfg.replace(ignore=None), graph=graph,  # ignore is in graph
                           criterion=lambda m, g, **c: by_index.get(g.index, np.zeros(g.size)), return_plan=True)
    if from_scratch:
        from prunekit.zoo.init import init_weights

        init_weights(small)
    return MethodResult(small, plan, {"criterion": "ucp attention", "attention_loss": loss,
                                      "from_scratch": from_scratch})
