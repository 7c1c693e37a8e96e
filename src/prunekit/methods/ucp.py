"""Uniform Channel Pruning with modified squeeze-excitation blocks, UCP (Chang et al. 2020).

What the paper and its authors' code (github.com/JingfeiChang/UCP) do, and how this module does it:

  1. **Blocks.** An SE block (Hu et al.) sits right after every convolution, before its BN
     (conv -> SE -> BN -> ReLU in the authors' SE-VGG and SE-ResNet): squeeze by the mean over
     positions, FC (C -> C/16, no bias) -> ReLU -> FC (-> C, no bias) -> sigmoid, one scale
     per channel and sample; with C <= 16 the hidden width is 1 and both FCs have biases (as
     the authors' ``SELayer``: the reduction rule, ``reduction=16``). Here the blocks are the
     ``se`` gate kind (:class:`prunekit.gates.se.SeGate`, block :class:`Excitation`),
     attached by :func:`prunekit.gates.attach_gates` with ``at="producers"``: one gate per
     prunable group, one block per producing layer of the group (conv or linear), scaling
     that layer's output through a forward hook (its blocks are submodules of the network).
  2. **Training.** The SE network is trained jointly, all weights and blocks together, on
     the task loss alone (no sparsity term). Here the blocks are trained together with the
     network by default (``train_network=True``) through :func:`prunekit.recover.train`, the
     network in train mode, for ``steps`` batches of ``loader``. ``l1`` (default 0, the
     paper's setting) adds ``l1`` x the blocks' mean scale to the loss, an option the paper
     does not have. ``train_network=False`` trains only the blocks (the network's weights
     frozen, its BN statistics still following the scaled inputs) on the calibration batches.
  3. **Importance.** A channel's importance is its mean excitation over data (the authors
     sum the SE outputs over the dataset), summed over the group's blocks (the ``se`` gate's
     importance, recorded over the calibration batches by :func:`record_excitation`): a
     ResNet stage's coupled channels (shortcut included) are scored and pruned as one set,
     the paper's "uniform" pruning of basic-block stages. The lowest are removed under the
     budget.
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
    removed, so after joint training each channel's mean excitation is folded in
    (``GateSet.fold(approximate=True)``): into the running statistics of the batch norm that
    reads the producer's output (the conv weights keep their trained size: folded into
    them, a mean of ~0.5 would halve them and, under the norm's scale invariance, make a
    later fine-tune act at ~4x its LR), or into the producer's weight and bias where no
    batch norm follows. The per-sample variation of the scale is lost. The paper never
    removes blocks from a network it keeps.
  * A block squeezes the channels of its own group only: for a layer whose output channels
    belong to several groups (e.g. split by a concat downstream), each group's block sees its
    part, where the authors' block sees the whole layer.
  * Target-less batches are labelled once, before training, with the network's own
    predictions (its SE gates switched off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import prunekit as pk
from prunekit.errors import PruningError
from prunekit.features import as_batch, call_on_device
from prunekit.gates import GateSet, attach_gates
from prunekit.gates.se import Excitation, SeGate
from prunekit.graph import module_names
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.methods._training import reinitialise
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig
from prunekit.recover.train import train

__all__ = ["Excitation", "record_excitation", "reinitialise", "train_attention", "ucp"]


class _ExcitationTraining(Callback):
    """Training-loop callback of the SE gates' training: clears the scales each gate kept
    from the previous pass and adds the optional L1 term on this pass's scales."""

    def __init__(self, gates: GateSet, l1: float) -> None:
        self.gates, self.l1 = gates, l1

    def _se(self) -> list[SeGate]:
        """The SE gates of the set."""
        return [g for g in self.gates.gates.values() if isinstance(g, SeGate)]

    def on_batch_start(self, model: nn.Module, step: int) -> None:
        """Clear the scales recorded by the previous forward. The network stays in the train
        mode the loop sets, so its BN statistics follow the scaled inputs, as in the paper's
        joint training."""
        for gate in self._se():
            gate.recent.clear()

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """Return the optional L1 term, ``l1`` times the sum over the blocks (one per site) of
        the mean scale of this forward (None when ``l1`` is 0, the paper's setting, or there is
        no block)."""
        scales = [s for gate in self._se() for s in gate.recent]
        if not self.l1 or not scales:
            return None
        return self.l1 * sum(s.mean() for s in scales)

    def on_train_end(self, model: nn.Module) -> None:
        """Drop the last pass's scales (tensors with a graph)."""
        for gate in self._se():
            gate.recent.clear()


@contextlib.contextmanager
def _gates_off(gates: GateSet) -> Iterator[None]:
    """Within the block the SE gates multiply by 1 (the network's own function)."""
    se = [g for g in gates.gates.values() if isinstance(g, SeGate)]
    before = [g.identity for g in se]
    for g in se:
        g.identity = True
    try:
        yield
    finally:
        for g, was in zip(se, before):
            g.identity = was


def record_excitation(model: nn.Module, gates: GateSet, batches: Iterable[Any]) -> None:
    """Run ``model`` (in its current mode, without gradients) on ``batches`` with the SE gates
    recording: afterwards each gate's :meth:`~prunekit.gates.se.SeGate.expected_values` is
    its mean excitation over those samples (the previous record is discarded)."""
    se = [g for g in gates.gates.values() if isinstance(g, SeGate)]
    for g in se:
        g.reset_statistics()
        g.recording = True
    try:
        with torch.no_grad():
            for x, _ in batches:
                call_on_device(model, x)
    finally:
        for g in se:
            g.recording = False


def _training_batches(model: nn.Module, source: Iterable[Any], steps: int) -> list[tuple[Tensor, Tensor]]:
    """The ``steps`` batches ``(inputs, targets)`` of the attention training: ``source``'s
    first pass cycled to length ``steps``, targets of target-less batches set to the model's
    predictions (in eval mode; the caller switches gates off for the network's own). Raises
    :class:`PruningError` for batches whose inputs or targets are not tensors."""
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


def train_attention(model: nn.Module, gates: GateSet, batches: Iterable[Any], *, steps: int, lr: float,
                    l1: float, seed: int = 0) -> float | None:
    """Train the SE gates ``gates`` attached to ``model`` (their blocks are its submodules),
    and the network's parameters that require gradients, for ``steps`` batches, cycling
    through ``batches``, with :func:`prunekit.recover.train` (AdamW, constant ``lr``, no
    weight decay); target-less batches are labelled first by the network without its gates.
    Return the mean loss (task + optional L1) over the steps, or None when ``steps`` is 0."""
    if steps <= 0:
        return None
    with _gates_off(gates):
        data = _training_batches(model, batches, steps)
    cfg = TrainConfig(epochs=1, lr=lr, optimizer="adamw", weight_decay=0.0, schedule="constant", seed=seed,
                      log_every=steps, tensorboard=False)
    final = train(model, data, cfg, progress=False, callbacks=[_ExcitationTraining(gates, l1)]).final
    return final["train_loss"] + final.get("train_extra_loss", 0.0)


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
    pruned model and its plan; ``info["attention_loss"]`` is the mean attention-training loss,
    ``info["importance"]`` each gated group's channel scores (mean excitation summed over its
    blocks) and ``info["retrain"]`` the retraining's :class:`~prunekit.recover.config.TrainResult`
    as a dict (final metrics, per-epoch history; None without ``from_scratch``). Raises
    :class:`PruningError` for ``from_scratch`` without ``retrain_loader``."""
    import copy

    if from_scratch and retrain_loader is None:
        raise PruningError("method 'ucp': from_scratch=True re-initialises the pruned network, which needs data to "
                           "retrain: pass retrain_loader= (batches of (inputs, targets)) and retrain_epochs=")
    cfg = budget_config(kwargs, "ucp")
    torch.manual_seed(seed)
    calib = take_batches(loader, batches, "ucp")
    names = module_names(model, list(cfg.ignore), "ignore") if cfg.ignore else None  # module objects -> names of the copy
    work = copy.deepcopy(model)
    work.requires_grad_(train_network)  # before the gates are attached: their blocks always train
    graph = pk.trace(work, example_inputs, ignore=names)
    gates = attach_gates(work, graph, kind="se", at="producers", reduction=reduction)
    try:
        loss = train_attention(work, gates, loader if train_network else calib, steps=steps, lr=lr, l1=l1, seed=seed)
        work.eval()  # also when steps=0: the importance is measured as the attention was trained, in eval mode
        record_excitation(work, gates, calib)
        by_index = {g.index: s for g, s in zip(gates.groups, gates.scores(gates.groups)) if s is not None}
        if train_network:
            gates.fold(approximate=True)  # the network was trained under the blocks' scales: keep their mean
    finally:
        gates.detach()
    source = work if train_network else model
    small, plan = pk.prune(source, example_inputs, config=cfg.replace(ignore=None), graph=graph,  # ignore is in graph
                           criterion=lambda m, g, **c: by_index.get(g.index, np.zeros(g.size)), return_plan=True)
    retrained = None
    if from_scratch:
        torch.manual_seed(seed)
        reinitialise(small, who="ucp from_scratch")
        result = train(small, retrain_loader, retrain_config or default_retrain_config(retrain_epochs, seed),
                       progress=False)
        small.eval()
        retrained = dataclasses.asdict(result)
    importance = {g.name: by_index[g.index].tolist() for g in graph.groups if g.index in by_index}
    return MethodResult(small, plan, {"criterion": "ucp excitation", "attention_loss": loss, "importance": importance,
                                      "from_scratch": from_scratch, "retrain": retrained})
