"""Trained Rank Pruning, TRP (Xu et al., IJCAI 2020; arXiv 1812.02402 / 2004.14566).

What the paper and its authors' code (github.com/yuhuixu1993/Trained-Rank-Pruning,
``cifar-TRP.py``) do, and how this module does it:

  1. **Low-rank approximation inside training.** Every ``period`` iterations, before the
     forward pass, each conv weight ``W`` is reshaped by the decomposition scheme (NC: the
     ``N x (C k k)`` matrix, channel-wise; VH: the ``(C k) x (N k)`` matrix, spatial), its SVD
     is truncated at an energy threshold ``e = 0.9`` (the smallest rank ``r`` keeping 90% of
     the squared singular values) and ``W`` is replaced by the truncated product ``U_r S_r
     V_r^T``; that iteration's forward and backward pass run on the low-rank filters and the
     update is applied to them. Here: :class:`TRPCallback`'s ``on_batch_start`` at global
     steps 1, 1 + ``period``, ..., through the layer handlers' ``rank_matrix`` /
     ``weight_from_rank_matrix`` (``mode="channel"`` is NC, ``"spatial"`` is VH).
  2. **Nuclear-norm regulariser by stochastic sub-gradient descent.** On those iterations
     ``lambda * U_r V_r^T`` (the sub-gradient of the nuclear norm at the low-rank ``W``;
     ``lambda = 3e-4`` for CIFAR) is added to ``W``'s gradient before the optimizer step.
     Here: ``on_before_step``, the loop's hook between the backward pass and the step.
  3. **Decomposition.** The trained network is decomposed with a *value* threshold (singular
     values under ``5e-2`` dropped) into two stacked convs (NC: ``k x k`` conv ``C -> r`` then
     1x1 ``r -> N``; VH: ``k x 1`` then ``1 x k``), optionally retrained. Here:
     :func:`prunekit.decompose.decompose` with ``threshold`` (default ``5e-2``), or ``energy``,
     or ``target_flops`` / ``target_params`` (its greedy rank allocation, within 2% of the
     budget), saved as Replace steps; ``finetune_epochs`` retrains the factorised network.

Departures from the paper:

  * ND (network decoupling, per-filter decomposition) is not implemented.
  * The authors' code leaves out the first conv, every 1x1 conv and, at decomposition, every
    strided conv. Here every conv the mode factorises is trained low-rank and decomposed
    unless it is in ``ignore`` (``ignore=["conv1"]`` gives the first-conv rule); a strided conv
    is factorised with its stride split over the factors, and 1x1 convs are factorised in
    ``"channel"`` mode (they have no VH form). Linear layers are left alone, as the paper does
    not decompose the final FC; ``include_linear=True`` adds them (``"channel"`` mode only).
  * The authors count ``period`` over the batches of each epoch (the count restarts every
    epoch); here over global steps.
  * At decomposition a layer whose factorised pair would cost more FLOPs than the layer (rank
    too close to full) is left whole; the authors' code factorises every selected layer.
  * The paper trains from scratch (164 epochs, lr 0.1 divided by 10 at epochs 81 and 122,
    weight decay 1e-4). Without ``train_config`` this module follows the project's convention
    for training methods: ``epochs`` of SGD (momentum 0.9) at lr 0.01 with cosine decay and
    weight decay 5e-4, a fine-tune of an already trained model. Pass the paper's schedule as
    ``train_config`` to train from scratch.
  * ``target_flops`` / ``target_params`` are additions (the paper has only the threshold); under
    a budget the ranks come from the greedy allocation on the trained weights' singular values.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.decompose import decompose
from prunekit.decompose.layers import energy_rank, factorisable
from prunekit.errors import PruningError
from prunekit.graph import module_names
from prunekit.handlers import handler_for
from prunekit.measure import count_flops, count_params
from prunekit.methods import MethodResult, budget_config, register
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig
from prunekit.recover.train import train

__all__ = ["TRPConfig", "TRPCallback", "low_rank_step", "trp"]

_MODES = {"channel": "channel", "nc": "channel", "spatial": "spatial", "vh": "spatial"}


@dataclasses.dataclass(frozen=True)
class TRPConfig:
    """TRP's own options (the budget ones are :func:`prunekit.methods.budget_config`'s).

    ``mode``: ``"channel"`` (NC) or ``"spatial"`` (VH). ``energy``: the energy threshold of the
    projection during training (0.9). ``period``: project every ``period`` steps (1).
    ``nuclear_weight``: weight of the nuclear-norm sub-gradient (3e-4; 0 turns it off).
    ``project``: replace the weights by their approximation (the authors' ``--trp``; False
    keeps only the regulariser). ``include_linear``: also train and decompose linear layers.
    ``threshold`` / ``final_energy``: the decomposition rule when no budget is given (value
    threshold 5e-2, or an energy threshold instead). ``finetune_epochs``: retraining of the
    factorised network (0: none), with the training config."""

    mode: str = "channel"
    energy: float = 0.9
    period: int = 1
    nuclear_weight: float = 3e-4
    project: bool = True
    include_linear: bool = False
    threshold: float = 5e-2
    final_energy: float | None = None
    finetune_epochs: int = 0

    def __post_init__(self) -> None:
        mode = _MODES.get(str(self.mode).lower())
        if mode is None:
            raise PruningError(f"trp: mode={self.mode!r}: 'channel' (NC) or 'spatial' (VH); ND is not implemented")
        object.__setattr__(self, "mode", mode)
        if not 0.0 < self.energy <= 1.0:
            raise PruningError(f"trp: energy={self.energy!r}: the fraction of squared singular values kept, in (0, 1]")
        if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
            raise PruningError(f"trp: period={self.period!r}: an integer >= 1 (steps between projections)")
        if self.nuclear_weight < 0:
            raise PruningError(f"trp: nuclear_weight={self.nuclear_weight!r}: must be >= 0")
        if self.threshold < 0:
            raise PruningError(f"trp: threshold={self.threshold!r}: a singular value, >= 0")
        if self.final_energy is not None and not 0.0 < self.final_energy <= 1.0:
            raise PruningError(f"trp: final_energy={self.final_energy!r}: in (0, 1]")
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise PruningError(f"trp: finetune_epochs={self.finetune_epochs!r}: an integer >= 0")


def low_rank_step(matrix: Tensor, energy: float) -> tuple[Tensor, Tensor, int]:
    """One TRP step on a weight's rank matrix: ``(U_r S_r V_r^T, U_r V_r^T, r)`` with ``r`` the
    energy rank (:func:`prunekit.decompose.layers.energy_rank`) of ``matrix = U S V^T``; the
    first is the projection, the second the nuclear-norm sub-gradient at it. Computed in
    float64, returned in ``matrix``'s dtype."""
    u, s, vt = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    r = energy_rank(s, energy)
    u, s, vt = u[:, :r], s[:r], vt[:r]
    return ((u * s) @ vt).to(matrix.dtype), (u @ vt).to(matrix.dtype), r


class TRPCallback(Callback):
    """The training half of TRP on the layers ``names`` of the trained model: every ``period``
    steps, before the forward pass, each weight is replaced by its energy-``energy``
    approximation (if ``project``) and ``nuclear_weight * U_r V_r^T`` is added to its gradient
    before that step's optimizer update. ``ranks`` holds the ranks of the last projection;
    each epoch's record gets ``trp_rank_fraction`` (mean rank / full rank over the layers)."""

    def __init__(self, names: Iterable[str], mode: str, *, energy: float = 0.9, period: int = 1,
                 nuclear_weight: float = 3e-4, project: bool = True) -> None:
        self.names = list(names)
        self.mode, self.energy, self.period = mode, energy, period
        self.nuclear_weight, self.project = nuclear_weight, project
        self.ranks: dict[str, int] = {}
        self.full_ranks: dict[str, int] = {}
        self.trajectory: list[float] = []
        self._sub: dict[str, Tensor] = {}

    def apply(self, model: nn.Module) -> dict[str, int]:
        """Project every layer now (and keep this step's sub-gradients); returns the ranks."""
        self._sub = {}
        with torch.no_grad():
            for name in self.names:
                m = model.get_submodule(name)
                handler = handler_for(m)
                matrix = handler.rank_matrix(m, self.mode) if handler is not None else None
                if matrix is None:
                    raise PruningError(f"trp: layer '{name}' has no {self.mode} rank matrix")
                approx, sub, r = low_rank_step(matrix, self.energy)
                if self.project:
                    m.weight.copy_(handler.weight_from_rank_matrix(m, approx, self.mode))
                if self.nuclear_weight > 0:
                    self._sub[name] = handler.weight_from_rank_matrix(m, sub, self.mode)
                self.ranks[name], self.full_ranks[name] = r, min(matrix.shape)
        return dict(self.ranks)

    def on_batch_start(self, model: nn.Module, step: int) -> None:
        """Project at steps 1, 1 + period, ...; other steps add no sub-gradient."""
        self._sub = {}
        if (step - 1) % self.period == 0:
            self.apply(model)

    def on_before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Add ``nuclear_weight * U_r V_r^T`` of this step's projection to each weight's gradient."""
        for name, sub in self._sub.items():
            w = model.get_submodule(name).weight
            if w.grad is None:
                w.grad = self.nuclear_weight * sub.clone()
            else:
                w.grad.add_(sub, alpha=self.nuclear_weight)
        self._sub = {}

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        """Record the mean rank fraction of the last projection."""
        if self.ranks:
            fraction = sum(self.ranks[n] / self.full_ranks[n] for n in self.ranks) / len(self.ranks)
            self.trajectory.append(fraction)
            record["trp_rank_fraction"] = fraction

    def state_dict(self) -> dict[str, Any]:
        """Ranks of the last projection and the per-epoch rank fractions."""
        return {"ranks": dict(self.ranks), "full_ranks": dict(self.full_ranks), "trajectory": list(self.trajectory)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.ranks = dict(state["ranks"])
        self.full_ranks = dict(state["full_ranks"])
        self.trajectory = list(state["trajectory"])


def default_train_config(epochs: int) -> TrainConfig:
    """The convention's fine-tuning config: SGD momentum 0.9, lr 0.01 cosine, weight decay 5e-4."""
    return TrainConfig(epochs=epochs, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine")


_OWN = {f.name for f in dataclasses.fields(TRPConfig)}


@register("trp")
def trp(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
        val_loader: Iterable[Any] | None = None, epochs: int | None = None, train_config: TrainConfig | None = None,
        run_dir: str | Path | None = None, resume: bool = False, options: TRPConfig | None = None,
        batches: int = 8, progress: bool = False, **kwargs: Any) -> MethodResult:
    """Train ``model`` (a copy) with TRP for ``epochs`` epochs of ``loader``, decompose it and
    optionally fine-tune it (module docstring); returns the factorised model, its plan (Replace
    steps relative to the original architecture) and ``info``.

    ``options`` (a :class:`TRPConfig`) and/or its fields as keywords set TRP's knobs; the other
    keywords are budget options (``target_flops`` / ``target_params``, ``ignore``, ``round_to``,
    ``config``; without a budget the decomposition uses ``threshold`` or ``final_energy``).
    ``train_config`` (its ``epochs`` overridden by ``epochs``) defaults to
    :func:`default_train_config`; ``run_dir`` / ``resume`` checkpoint and resume both training
    phases (``run_dir/trp``, ``run_dir/finetune``). ``batches`` is accepted for the common
    method call and unused. ``info`` holds the rank trajectory, the decomposition record,
    the expected and measured FLOPs, the training histories and the departures taken."""
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in _OWN}
    opts = dataclasses.replace(options, **own) if options is not None else TRPConfig(**own)
    budget = budget_config(kwargs, "trp")
    target = budget.target
    if target is not None and target[0] == "latency":
        raise PruningError("trp: target_latency is not supported (use target_flops or target_params)")
    if loader is None:
        raise PruningError("method 'trp' trains: pass loader=... (batches of (inputs, targets)) and epochs=...")
    if epochs is None and train_config is None:
        raise PruningError("method 'trp' trains: pass epochs=... (or a train_config)")
    cfg = train_config if train_config is not None else default_train_config(int(epochs or 0))
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=int(epochs))
    ignore = module_names(model, budget.ignore, "ignore")
    work = copy.deepcopy(model)
    layers, _ = factorisable(work, opts.mode, ignore)
    # A conv has kernel dims in its weight; a linear layer's weight is a matrix.
    trained = [n for n, m in layers if opts.include_linear or m.weight.ndim > 2]
    if not trained:
        raise PruningError(f"trp: no layer of the model has a {opts.mode} decomposition (outside ignore)")
    callback = TRPCallback(trained, opts.mode, energy=opts.energy, period=opts.period,
                           nuclear_weight=opts.nuclear_weight, project=opts.project)
    run = Path(run_dir) if run_dir is not None else None
    history = train(work, loader, cfg, val_loader=val_loader, run_dir=run / "trp" if run else None, resume=resume,
                    progress=progress, callbacks=[callback]).history
    work.eval()
    rule: dict[str, Any]
    if target is not None:
        rule = {f"target_{target[0]}": target[1]}
    elif opts.final_energy is not None:
        rule = {"energy": opts.final_energy}
    else:
        rule = {"threshold": opts.threshold}
    left_out = [n for n, _ in layers if n not in trained]
    small, plan = decompose(work, example_inputs, mode=opts.mode, round_to=budget.round_to,
                            ignore=tuple(ignore) + tuple(left_out), **rule)
    record = plan.meta["decompose"]
    record["left_alone"].update({n: "a linear layer (TRP trains convs; include_linear=True adds it)" for n in left_out})
    finetuned: list[dict[str, Any]] = []
    if opts.finetune_epochs > 0:
        ft = dataclasses.replace(cfg, epochs=opts.finetune_epochs)
        finetuned = train(small, loader, ft, val_loader=val_loader, run_dir=run / "finetune" if run else None,
                          resume=resume, progress=progress).history
    small.eval()
    flops = (count_flops(model, example_inputs), count_flops(small, example_inputs))
    params = (count_params(model), count_params(small))
    departures = ["period counted over global steps, not per epoch", "ND decomposition not available"]
    if train_config is None:
        departures.append("convention fine-tune schedule (SGD 0.01 cosine, wd 5e-4), not the paper's from-scratch one")
    if left_out:
        departures.append(f"linear layers left alone: {', '.join(left_out)}")
    skipped = [n for n, why in record["left_alone"].items() if "would not reduce" in why]
    if skipped:
        departures.append(f"left whole (factorising would not reduce FLOPs): {', '.join(skipped)}")
    if target is not None:
        departures.append(f"ranks allocated under target_{target[0]}={target[1]} instead of the value threshold")
    info = {
        "method": "trp", "mode": opts.mode, "options": dataclasses.asdict(opts), "trained_layers": trained,
        "rank_trajectory": callback.trajectory, "last_projection_ranks": dict(callback.ranks),
        "decompose": record,
        "flops": {"before": flops[0], "after": flops[1], "fraction": flops[1] / flops[0],
                  "expected": target[1] if target is not None and target[0] == "flops" else None},
        "params": {"before": params[0], "after": params[1], "fraction": params[1] / params[0]},
        "train_history": history, "finetune_history": finetuned, "departures": departures,
    }
    return MethodResult(small, plan.with_meta(method="trp"), info)


trp.trains = True  # type: ignore[attr-defined]
