"""Uniform Channel Pruning with modified squeeze-excitation blocks, UCP (Chang et al. 2020).

What the paper and its authors' code (github.com/JingfeiChang/UCP) do, and how this module does it:

  1. **Blocks.** An SE block (Hu et al.) sits right after every convolution, before its BN
     (conv -> SE -> BN -> ReLU in the authors' SE-VGG and SE-ResNet): squeeze by the mean over
     positions, FC (C -> C/16, no bias) -> ReLU -> FC (-> C, no bias) -> sigmoid, one scale
     per channel and sample; with C <= 16 the hidden width is 1 and both FCs have biases (as
     the authors' ``SELayer``). Here a block is attached with a forward hook to the output of
     every producing layer (conv or linear) of every prunable group, with the same
     reduction rule (``reduction=16``).
  2. **Training.** The SE network is trained jointly, all weights and blocks together, on
     the task loss alone (no sparsity term). Here the blocks are trained together with the
     network by default (``train_network=True``) through :func:`prunekit.recover.train`, the
     network in train mode, for ``steps`` batches of ``loader``. ``l1`` (default 0, the
     paper's setting) adds ``l1`` x the blocks' mean scale to the loss, an option the paper
     does not have. ``train_network=False`` trains only the blocks (the network's weights
     frozen, its BN statistics still following the scaled inputs) on the calibration batches.
  3. **Importance.** A channel's importance is its mean excitation over data (the authors
     sum the SE outputs over the dataset), summed over the group's blocks: a ResNet stage's
     coupled channels (shortcut included) are scored and pruned as one set, the paper's
     "uniform" pruning of basic-block stages. The lowest are removed under the budget.
  4. **Recovery.** The paper retrains the compact network from scratch. ``from_scratch=True``
     re-initialises every parameter and buffer of the pruned network (``reset_parameters()``
     on every module, ``reset_running_stats()`` on norms) and retrains it with
     :func:`prunekit.recover.train` on ``retrain_loader`` for ``retrain_epochs`` (SGD, lr 0.1,
     momentum 0.9, weight decay 1e-4, LR x0.1 at 50% and 75% of the epochs: the authors'
     CIFAR schedule, which is 160 epochs; or pass ``retrain_config``).

Departures from the paper:

  * The paper trains the SE network from random initialisation (160 epochs); here the
    blocks are attached to an already trained network and trained with it for ``steps``
    batches (Adam-type updates, constant LR), a budget chosen by the caller.
  * The paper's "modification" of the SE block is not described in the sources available to
    us; the block is the authors' code's ``SELayer`` (a plain SE block with their small-C rule).
  * The blocks sit at every producer of a coupled group (for a residual stage: each block's
    last conv and the shortcut/stem conv), where the authors place one per convolution of the
    layers they prune; bottleneck-only pruning of the middle conv is not enforced (the budget
    and ``ignore`` decide which groups are pruned).
  * Without ``from_scratch`` the pruned network is kept (fine-tune it yourself). Its blocks are
    removed, so after joint training each channel's mean excitation is folded into its
    producer's weight and bias (the block scaled that output); the per-sample variation of the
    scale is lost. The paper never removes blocks from a network it keeps.
  * Target-less batches are labelled once, before training, with the network's own predictions.
"""

from __future__ import annotations

import dataclasses
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
    """The authors' SE block: squeeze (mean over positions) -> FC (no bias) -> ReLU -> FC (no
    bias) -> sigmoid, one scale per channel and sample; hidden width ``channels // reduction``,
    or 1 with biased FCs when ``channels <= reduction``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        small = channels <= reduction
        hidden = 1 if small else channels // reduction
        self.fc1 = nn.Linear(channels, hidden, bias=small)
        self.fc2 = nn.Linear(hidden, channels, bias=small)

    def forward(self, x: Tensor, channel_dim: int) -> Tensor:
        """Scales of shape ``(batch, channels)`` for activation ``x``."""
        squeezed = x.movedim(channel_dim, -1).reshape(x.shape[0], -1, x.shape[channel_dim]).mean(1)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))


def _sites(model: nn.Module, group: ChannelGroup) -> list[tuple[str, nn.Module, np.ndarray, int]]:
    """(module, channel map, channel dim of its output) of the group's producing layers, whose
    outputs the blocks scale (conv -> SE -> BN, as the authors place them)."""
    producers = []
    for m in group.members:
        name, _, leaf = m.tensor.rpartition(".")
        mod = model.get_submodule(name) if name else model
        if leaf != "weight" or m.role != "out":
            continue
        if isinstance(mod, nn.Linear):
            producers.append((name, mod, m.channel, -1))
        elif isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
            producers.append((name, mod, m.channel, 1))
    return producers


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

    def means(self) -> dict[str, Tensor]:
        """Mean scale per channel of every block (by producer module name), as recorded."""
        return {name: self.sums[_key(name)] / max(1, self.count) for _, name, _, _ in self.sites}

    def fold_into(self, model: nn.Module) -> None:
        """Multiply each producer's output channels (weight rows and bias) by its block's mean
        scale: what the block did to that output, on average, once the block is gone."""
        with torch.no_grad():
            for name, mean in self.means().items():
                mod = model.get_submodule(name) if name else model
                mod.weight.mul_(mean.to(mod.weight.dtype).view(-1, *[1] * (mod.weight.ndim - 1)))
                if mod.bias is not None:
                    mod.bias.mul_(mean.to(mod.bias.dtype))

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
        """Clear the scales recorded by the previous forward. The network stays in the train
        mode the loop sets, so its BN statistics follow the scaled inputs, as in the paper's
        joint training."""
        self.att.last = []

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """Return the optional L1 term, ``l1`` times the sum over blocks of the mean scale of
        this forward (None when ``l1`` is 0, the paper's setting, or there is no block)."""
        if not self.l1 or not self.att.last:
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
                    l1: float, seed: int = 0) -> float | None:
    """Train the attention blocks, and the network's parameters that require gradients, for
    ``steps`` batches, cycling through ``batches``, with :func:`prunekit.recover.train`;
    return the mean loss (task + optional L1) over the steps, or None when ``steps`` is 0."""
    if steps <= 0:
        return None
    data = _training_batches(model, batches, steps)
    cfg = TrainConfig(epochs=1, lr=lr, optimizer="adamw", weight_decay=0.0, schedule="constant", seed=seed,
                      log_every=steps, tensorboard=False)
    final = train(model, data, cfg, progress=False, callbacks=[_AttentionTraining(att, l1)]).final
    return final["train_loss"] + final.get("train_extra_loss", 0.0)


def reinitialise(model: nn.Module) -> None:
    """Re-initialise every parameter and buffer of ``model`` in place: ``reset_parameters()``
    on every module that has it, ``reset_running_stats()`` on every norm that keeps statistics.
    Raises :class:`PruningError` naming the tensors no module can reset (their module has no
    ``reset_parameters``): a "from scratch" network must not keep trained values."""
    kept = []
    for name, mod in model.named_modules():
        resets = callable(getattr(mod, "reset_parameters", None))
        if resets:
            mod.reset_parameters()
        if callable(getattr(mod, "reset_running_stats", None)):
            mod.reset_running_stats()
        elif not resets:
            kept += [f"{name}.{t}" if name else t for t, v in (*mod._parameters.items(), *mod._buffers.items())
                     if v is not None]
    if kept:
        raise PruningError(f"ucp from_scratch: cannot re-initialise {', '.join(kept)} (their module has no "
                           "reset_parameters()); retrain without from_scratch or give those modules one")


def default_retrain_config(epochs: int, seed: int) -> TrainConfig:
    """The authors' CIFAR retraining schedule over ``epochs``: SGD, lr 0.1, momentum 0.9,
    weight decay 1e-4, LR x0.1 at 50% and 75% of the epochs."""
    return TrainConfig(epochs=epochs, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=1e-4, schedule="step",
                       gamma=0.1, seed=seed, tensorboard=False)


@register("ucp")
def ucp(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None, batches: int = 8,
        steps: int = 100, lr: float = 1e-2, l1: float = 0.0, reduction: int = 16, train_network: bool = True,
        from_scratch: bool = False, retrain_loader: Iterable[Any] | None = None, retrain_epochs: int = 160,
        retrain_config: TrainConfig | None = None, seed: int = 0, **kwargs: Any) -> MethodResult:
    """Prune with the excitation of SE blocks (UCP) under the budget in ``kwargs``.

    Attaches the blocks and trains them with the network (``train_network``, default) for
    ``steps`` batches of ``loader``, or alone on the calibration batches (the first
    ``batches`` of ``loader``, over which the importance is averaged); ``l1`` adds an optional
    L1 term on the scales (0: none, the paper's setting). The user's model is not changed (a
    copy is trained). With ``from_scratch`` the pruned network is re-initialised
    (:func:`reinitialise`, seeded with ``seed``) and retrained on ``retrain_loader`` for
    ``retrain_epochs`` with :func:`default_retrain_config` (or ``retrain_config``). Returns the
    pruned model and its plan; ``info["attention_loss"]`` is the mean attention-training loss
    and ``info["retrain"]`` the retraining's :class:`~prunekit.recover.config.TrainResult` as
    a dict (final metrics, per-epoch history; None without ``from_scratch``). Raises :class:`PruningError` for ``from_scratch``
    without ``retrain_loader``."""
    import copy

    if from_scratch and retrain_loader is None:
        raise PruningError("method 'ucp': from_scratch=True re-initialises the pruned network, which needs data to "
                           "retrain: pass retrain_loader= (batches of (inputs, targets)) and retrain_epochs=")
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
        loss = train_attention(work, att, loader if train_network else calib, steps=steps, lr=lr, l1=l1, seed=seed)
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
    if train_network:
        att.fold_into(work)  # the network was trained under the blocks' scales: keep their mean
    source = work if train_network else model
    small, plan = pk.prune(source, example_inputs, config=cfg.replace(ignore=None), graph=graph,  # ignore is in graph
                           criterion=lambda m, g, **c: by_index.get(g.index, np.zeros(g.size)), return_plan=True)
    retrained = None
    if from_scratch:
        torch.manual_seed(seed)
        reinitialise(small)
        result = train(small, retrain_loader, retrain_config or default_retrain_config(retrain_epochs, seed),
                       progress=False)
        small.eval()
        retrained = dataclasses.asdict(result)
    return MethodResult(small, plan, {"criterion": "ucp excitation", "attention_loss": loss,
                                      "from_scratch": from_scratch, "retrain": retrained})
