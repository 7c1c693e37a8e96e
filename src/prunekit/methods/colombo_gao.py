"""Differentiable architecture pruning for transfer learning (Colombo & Gao, ICML 2021
workshop; arXiv 2107.03375).

What the paper does, and how this module does it:

  1. **Search space.** The units of a given large (pretrained) model; an architecture is a
     subset of them. Here the units are channels: every coupled group gets one architecture
     variable ``theta_c`` per channel, a ``two_temperature`` gate
     (:class:`prunekit.gates.two_temperature.TwoTemperatureGate`) multiplying the channel after
     its normalisation (residual-coupled channels share theirs: the group is the unit).
  2. **Architecture trained independently of the weights.** Here the weights are *frozen*:
     the given network's weights, BatchNorm running statistics and dropout stay as trained
     (the network runs in eval mode; only the gates sample), and the only trainable variables
     of the search are the ``theta``: the training loop (:func:`prunekit.recover.train`, one
     step per batch of ``loader``) holds them alone, in a param group of their own at
     ``arch_lr`` without weight decay (``train_config``'s optimizer and schedule: SGD with
     momentum 0.9 and cosine decay by default). The architecture is thus a function of the
     task and of the fixed weights only, and what transfers is the architecture, not
     retrained weights.
  3. **Complexity penalty.** The loss is the task loss plus ``budget_weight *
     |log(E[cost] / target)|``, the expected cost of the selection probabilities from the
     cost model (:class:`prunekit.allocate.cost.CostModel`): FLOPs for ``target_flops``,
     params / latency / the kept channel fraction for the other budgets.
  4. **Two-temperature relaxation.** The discrete subset is relaxed with two temperatures:
     one for the selection probabilities, ``p_c = sigmoid(theta_c / T_select)``, annealed
     from ``start_temperature`` to ``end_temperature`` over the search (``T0 / (1 + (T0 / T_end
     - 1) s / S)`` after step ``s`` of ``S``) so that the probabilities become a subset, and
     one for the relaxed sampling, a binary Concrete draw with probability ``p_c`` at
     ``sample_temperature``, ``z_c = sigmoid((theta_c / T_select + L_c) / T_sample)``, one
     logistic noise ``L_c`` per channel and step.
  5. **Extraction.** The probabilities' log-odds ``theta / T_select`` are the scores of the
     ordinary allocator (:func:`prunekit.gates.prune_with_gates`, one global ranking), which
     removes the channels to the exact budget (``round_to``, ``min_channels``, ``ignore``
     honoured); the probabilities of the kept channels (near 1 after the annealing) are
     folded into their layers.
  6. **Retraining on a new task with few data.** :func:`transfer` (or ``retrain_loader=`` /
     ``retrain_epochs=`` here) copies the extracted architecture, re-creates its classifier
     for ``num_classes`` classes (:func:`prunekit.surgery.head.find_head` names it from the
     trace, its handler rebuilds it: any conv or linear head; the plan gains the
     :class:`~prunekit.plan.Replace` step), re-initialises every parameter and buffer
     (``reinit=True``, :func:`prunekit.methods._training.reinitialise`, under ``seed``) and
     trains it on the new task with :func:`prunekit.recover.train`.

Departures from the paper (only its abstract and a summary were available, ``PAPERS.md``
#8; the formulas are our reading):

  * "Independently of the weights" is read as *frozen weights*: the paper may alternate
    weight and architecture updates on separate splits (as DARTS); here the weights never
    train during the search (``val_loader`` is only evaluated).
  * The two-temperature scheme is our reading of "one temperature for the relaxed sampling
    and one for the selection probabilities": its exact form, schedules (selection annealed,
    sampling constant) and values are ours.
  * The complexity penalty is two-sided around the user's budget (the paper penalises
    complexity with a weight, without a target), and the final subset is the allocator's
    exact budget, not a threshold at 0.5 (``info["kept_above_half"]`` counts those). With a
    fixed weight the task can win: on the planted test net every probability ended at 1
    (target 70% of the channels) and the subset is then the ranking of ``theta`` alone;
    ``info["budget"]`` reports the expected cost at the end against the selected one.
  * The paper's convergence guarantees are not reproduced.
  * No fine-tuning of the extracted architecture on the search task; with ``reinit=False``
    the transfer starts from the searched network's (folded) weights, an option the paper
    does not have.
  * The variables start at ``theta = 0`` (probability 0.5: no channel preferred) and move by
    momentum SGD at ``arch_lr = 1``: our choices. Adam (DARTS's optimizer for architecture
    variables) equalises the step of every variable, which lost the ranking on our planted
    test net (the important channel was removed); from ``theta = 1`` the annealing saturated
    the probabilities before the penalty had moved them (the expected cost stayed at 1).

Measured (CPU, one run of the search; ``benchmarks/baselines/fashion-mnist``'s trained ResNet-20,
94.0% on 2000 Fashion-MNIST test images): a search of 2 epochs over 2000 training images at
``target_flops=0.5`` ended with 98.7% of the probabilities within 0.01 of 0 or 1 and expected
FLOPs of 49.97% against 49.82% measured on the extracted network, which scores 49.4% on
Fashion-MNIST with its frozen weights and no fine-tuning (the same budget by L2 norm: 19.1%,
random: 11.1%). Transferred to 300 of scikit-learn's digits (re-initialised, new 10-class
head, 30 epochs of :func:`transfer_config`, 3 seeds, 360 test digits): 97.2% (96.7-97.8)
against 97.9% (97.8-98.1) for the L2-chosen and 97.9% (97.8-98.1) for the randomly chosen
architecture of the same FLOPs: the paper's claim that a searched architecture transfers
better does not show at this scale (digits are learned by any of them).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import prunekit as pk
from prunekit.errors import PruningError
from prunekit.gates import GateSet, attach_gates, prune_with_gates
from prunekit.methods import MethodResult, budget_config, register
from prunekit.methods._training import (
    ExpectedCost,
    Trajectory,
    anneal,
    binary_fraction,
    budget_penalty,
    budget_report,
    check_loader,
    default_train_config,
    gate_snapshot,
    own_param_group,
    reinitialise,
    split_options,
    training_config,
    working_copy,
)
from prunekit.plan import PruningPlan, compose
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig
from prunekit.recover.train import steps_per_epoch, train
from prunekit.surgery.head import find_head, head_step

__all__ = ["ColomboGaoOptions", "colombo_gao", "transfer", "transfer_config"]


@dataclasses.dataclass(frozen=True)
class ColomboGaoOptions:
    """The search's knobs: the architecture variables' learning rate (their param group's),
    the weight of the complexity penalty, the selection temperature's start and end, the
    sampling temperature and the variables' initial value (0: probability 0.5)."""

    arch_lr: float = 1.0
    budget_weight: float = 1.0
    start_temperature: float = 1.0
    end_temperature: float = 0.02
    sample_temperature: float = 0.5
    init: float = 0.0

    def __post_init__(self) -> None:
        """Check the values (ValueError naming the option)."""
        for key in ("arch_lr", "budget_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"colombo_gao: {key}={getattr(self, key)} must be >= 0")
        if not 0 < self.end_temperature <= self.start_temperature:
            raise ValueError(f"colombo_gao: need 0 < end_temperature <= start_temperature, got "
                             f"{self.end_temperature} and {self.start_temperature}")
        if self.sample_temperature <= 0:
            raise ValueError(f"colombo_gao: sample_temperature={self.sample_temperature} must be > 0")


class _ArchitectureSearch(Callback):
    """The architecture variables in a param group of their own (the loop's optimizer holds
    nothing else: the weights are frozen); per batch the network in eval mode with sampling
    gates, one noise draw and the complexity penalty; after every step the selection
    temperature of the next one."""

    def __init__(self, gates: GateSet, term: ExpectedCost, opts: ColomboGaoOptions, total_steps: int) -> None:
        self.gates, self.term, self.opts, self.total = gates, term, opts, max(1, total_steps)
        self.thetas = [g.logit for g in gates.gates.values()]  # type: ignore[union-attr]

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Give the architecture variables their group: ``arch_lr``, no weight decay (it would
        pull every probability towards 0.5). Done the same way on a resume, before the
        optimizer state is loaded."""
        own_param_group(optimizer, self.thetas, self.opts.arch_lr, weight_decay=0.0)

    def on_batch_start(self, model: nn.Module, step: int) -> None:
        """Frozen network (eval mode: the trained BN statistics, no dropout), sampling gates,
        this step's noise."""
        model.eval()
        for gate in self.gates.gates.values():
            gate.train()
            gate.resample()  # type: ignore[operator]

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """``budget_weight * |log(E[cost] / target)|`` at the selection probabilities."""
        if not self.opts.budget_weight:
            return None
        frac = self.term.fraction(self.gates.mask(self.term.cost.groups))
        return (self.opts.budget_weight * budget_penalty(frac, self.term.target)).to(batch[0].device, torch.float32)

    def temperature(self, step: int) -> float:
        """The selection temperature after ``step`` of the run's steps."""
        return anneal(self.opts.start_temperature, self.opts.end_temperature, step / self.total)

    def on_step(self, model: nn.Module, step: int) -> None:
        """Anneal the selection temperature for the next step (a buffer: checkpoints keep it)."""
        for gate in self.gates.gates.values():
            gate.selection_temperature.fill_(self.temperature(step))  # type: ignore[union-attr,operator]


def transfer_config(epochs: int, reinit: bool = True, seed: int = 0) -> TrainConfig:
    """The default retraining on the new task: :func:`default_train_config` (SGD, momentum
    0.9, cosine, weight decay 5e-4) for ``epochs`` epochs at lr 0.05 from a re-initialised
    network (training from scratch), 0.01 when the searched weights are kept; seeded ``seed``."""
    return dataclasses.replace(default_train_config(epochs), lr=0.05 if reinit else 0.01, seed=seed)


def transfer(result: MethodResult, loader: Iterable[Any] | None, epochs: int | None = None, *,
             num_classes: int | None = None, reinit: bool = True, train_config: TrainConfig | None = None,
             val_loader: Iterable[Any] | None = None, seed: int = 0, head: str | None = None,
             example_inputs: Any = None, run_dir: Any = None, resume: bool = False,
             progress: bool = False) -> MethodResult:
    """Retrain the architecture ``result`` extracted on a new task (batches of ``loader``) for
    ``epochs`` epochs (default: ``train_config``'s, else 10).

    A copy of ``result.model`` is changed (``result`` stays as it was): with ``num_classes``
    its classifier (``head``, else ``result.info["head"]``, else found by tracing with
    ``example_inputs``: :func:`prunekit.surgery.head.find_head`) is re-created with that many
    outputs, drawn under ``seed``; with ``reinit`` (default) every parameter and buffer is then
    re-initialised under ``seed`` (:func:`prunekit.methods._training.reinitialise`: the
    architecture transfers, not the weights); then it trains with :func:`transfer_config` (or
    ``train_config``) through :func:`prunekit.recover.train` (``run_dir``/``resume``:
    checkpoints, exact resume). Returns the retrained model (eval mode), the plan from the
    original model to it (the head's :class:`~prunekit.plan.Replace` step appended) and
    ``result.info`` with ``info["transfer"]`` (head, class count, reinit, seed, training
    history). Raises :class:`PruningError` without ``loader``, for a head that cannot be found
    or rebuilt, or for tensors ``reinitialise`` cannot reset."""
    loader = check_loader(loader, "colombo_gao transfer")
    model = copy.deepcopy(result.model)
    plan = result.plan
    name = None
    if num_classes is not None:
        name = head or result.info.get("head")
        if name is None:
            if example_inputs is None:
                raise PruningError("colombo_gao transfer: num_classes needs the classifier's name: pass head= or "
                                   "example_inputs= (to find it by tracing)")
            name = find_head(model, pk.trace(model.eval(), example_inputs))
        torch.manual_seed(seed)
        step = head_step(model, name, num_classes)
        model = pk.apply_plan(model, PruningPlan((step,)), inplace=True)
        plan = dataclasses.replace(compose(plan, PruningPlan((step,))),
                                   meta={**plan.meta, "transfer_head": {"module": name, "num_classes": int(num_classes)}})
    if reinit:
        torch.manual_seed(seed)
        reinitialise(model, who="colombo_gao transfer")
    cfg = train_config if train_config is not None else transfer_config(10 if epochs is None else epochs, reinit, seed)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=int(epochs))
    trained = train(model, loader, cfg, val_loader=val_loader, run_dir=run_dir, resume=resume, progress=progress)
    model.eval()
    info = {**result.info, "transfer": {"head": name, "num_classes": num_classes, "reinit": reinit, "seed": seed,
                                        "epochs": trained.epochs_completed, "final": trained.final,
                                        "resumed_from_epoch": trained.resumed_from_epoch, "history": trained.history}}
    return MethodResult(model, plan, info)


@register("colombo_gao")
def colombo_gao(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
                val_loader: Iterable[Any] | None = None, epochs: int | None = None,
                train_config: TrainConfig | None = None, run_dir: Any = None, resume: bool = False,
                batches: int | None = None, progress: bool = False, options: ColomboGaoOptions | None = None,
                retrain_loader: Iterable[Any] | None = None, retrain_epochs: int | None = None,
                retrain_config: TrainConfig | None = None, num_classes: int | None = None, reinit: bool = True,
                seed: int = 0, **kwargs: Any) -> MethodResult:
    """Search a sub-architecture of ``model`` (frozen weights) with architecture variables
    trained for ``epochs`` epochs of ``loader`` under the budget in ``kwargs``, extract it, and
    with ``retrain_loader`` retrain it on that new task (:func:`transfer`: ``retrain_epochs``,
    ``retrain_config``, ``num_classes``, ``reinit``, ``seed``).

    ``options`` (:class:`ColomboGaoOptions`) or its fields as keywords set the search's knobs;
    the other keywords are budget options (:func:`prunekit.methods.budget_config`).
    ``train_config`` sets the search's epochs, steps per epoch, seed, optimizer and LR
    schedule, which drive the architecture variables alone (at ``arch_lr``; the weights are
    frozen); ``val_loader`` is evaluated after every epoch. ``run_dir``/``resume``:
    checkpoints of the search (architecture variables, temperatures, the optimizer, RNG) and
    of the transfer (``run_dir/transfer``), so a killed run resumes exactly. Returns the extracted model (eval mode; retrained when
    ``retrain_loader`` is given), its plan and ``info``: the per-epoch trajectory (keep
    fraction per group, expected cost against the target), ``binary_fraction`` (probabilities
    within 0.01 of 0 or 1), the final temperatures, the classifier's name (``head``), the
    budget report, the search's training history and, after a transfer, ``info["transfer"]``.
    The user's model is not changed. Raises :class:`PruningError` without ``loader``, for
    unknown options, for ``num_classes``/``retrain_epochs`` without ``retrain_loader`` or when
    no group can be pruned."""
    opts, rest = split_options(kwargs, ColomboGaoOptions, options, "colombo_gao")
    cfg = budget_config(rest, "colombo_gao")
    loader = check_loader(loader, "colombo_gao")
    if retrain_loader is None and (num_classes is not None or retrain_epochs is not None):
        raise PruningError("method 'colombo_gao': num_classes= and retrain_epochs= are for the retraining on the new "
                           "task: pass retrain_loader= (its batches of (inputs, targets))")
    tcfg = training_config(train_config, epochs, batches)
    work = working_copy(model, example_inputs, cfg)
    head = find_head(work.model, work.graph)
    trainable = {n: p.requires_grad for n, p in work.model.named_parameters()}
    work.model.requires_grad_(False)  # frozen weights: the architecture is searched on them
    gates = attach_gates(work.model, work.graph, kind="two_temperature", init=opts.init,
                         selection_temperature=opts.start_temperature, sample_temperature=opts.sample_temperature)
    if not gates.gates:
        raise PruningError("method 'colombo_gao': no prunable channel group to search (all ignored or unprunable); "
                           "the weights are frozen, so there would be nothing to train")
    term = ExpectedCost(work.cost, work.config)
    total = tcfg.epochs * steps_per_epoch(loader, tcfg)
    search = _ArchitectureSearch(gates, term, opts, total)
    trajectory = Trajectory(lambda: gate_snapshot(gates, gates.groups, term))
    result = train(work.model, loader, tcfg, val_loader=val_loader, run_dir=run_dir, resume=resume,
                   progress=progress, callbacks=[search, trajectory])
    work.model.eval()
    with torch.no_grad():
        end_mask = gates.mask(work.cost.groups)
        values = torch.cat([g.expected_values().reshape(-1) for g in gates.gates.values()])  # type: ignore[operator]
    first = next(iter(gates.gates.values()), None)
    small, plan = prune_with_gates(work.model, example_inputs, gates, work.graph, config=work.config)
    small.eval()
    for name, p in small.named_parameters():
        p.requires_grad_(trainable.get(name, True))  # as the user's model had them
    info = {"method": "colombo_gao", "options": dataclasses.asdict(opts),
            "weights": "frozen during the search (the given network's, eval mode)", "head": head,
            "binary_fraction": binary_fraction(values), "kept_above_half": int((values > 0.5).sum()),
            "architecture_variables": int(values.numel()),
            "final_selection_temperature": float(first.selection_temperature) if first is not None else None,  # type: ignore[arg-type]
            "sample_temperature": opts.sample_temperature, "trajectory": trajectory.history,
            "budget": budget_report(work, term, plan, small, example_inputs, end_mask),
            "train": {"epochs": result.epochs_completed, "resumed_from_epoch": result.resumed_from_epoch,
                      "history": result.history}}
    res = MethodResult(small, plan, info)
    if retrain_loader is not None:
        res = transfer(res, retrain_loader, retrain_epochs, num_classes=num_classes, reinit=reinit,
                       train_config=retrain_config, seed=seed,
                       run_dir=Path(run_dir) / "transfer" if run_dir is not None else None, resume=resume,
                       progress=progress)
    return res


colombo_gao.trains = True  # type: ignore[attr-defined]
