"""Operation-aware soft channel pruning, SCP (Kang & Han, ICML 2020).

What the paper does, and how this module does it:

  1. **Deactivation probability.** For a conv -> BN -> ReLU channel ``c`` the BN output is
     modelled as ``N(beta_c, gamma_c^2)`` (the normalised input is standard normal), so the
     ReLU zeroes the channel with probability ``Phi(-beta_c / |gamma_c|)``. Here every coupled
     group whose gate sites are all BatchNorm layers feeding only ReLU ops (read off the
     trace) gets an ``scp`` gate (:class:`prunekit.gates.scp.ScpGate`) bound to those layers:
     its keep probability is ``Phi(beta / |gamma|)`` of their own affine parameters.
  2. **Soft differentiable masks.** Each channel is multiplied by a relaxed Bernoulli sample
     with that keep probability (binary Concrete / Gumbel-sigmoid at ``temperature``), drawn
     once per training step; the masks have no parameters of their own, so learning the
     weights (``gamma``, ``beta`` included) jointly with the task loss learns the masks.
     Evaluation uses the expectation (the keep probability).
  3. **Budget regulariser.** The *expected* cost of the masks, the cost model
     (:class:`prunekit.allocate.cost.CostModel`) at the keep probabilities (FLOPs for
     ``target_flops``; params / latency / the kept channel fraction for the other budgets), is
     pushed down by ``budget_weight * expected / target``, added to the loss: a constant pull
     on every channel's probability in proportion to the cost it carries, which the task loss
     resists for the channels it needs.
  4. **Removal.** Channels with a high deactivation probability are removed at the end:
     the gates' keep log-odds are the scores of the ordinary allocator
     (:func:`prunekit.gates.prune_with_gates`), ranked across all groups on their one scale
     (``global_ranking="raw"``), which meets the budget exactly (within one
     channel) with ``round_to``, ``min_channels`` and ``ignore`` honoured; the expected masks
     of the kept channels are folded into their BN layers, so the pruned network computes
     what the masked network computed in evaluation. No separate fine-tuning.

Departures from the paper (whose exact relaxation and regulariser we could not read; the
sources available to us give the mechanism, see ``PAPERS.md`` #7):

  * The regulariser's form (linear in the cost model's expected cost, relative to the
    target) and the relaxation (binary Concrete with one noise draw per channel and step,
    shared by the batch, temperature 0.5, constant) are our reconstruction. A term that
    vanishes at the budget (``|log(expected / target)|``, as DAIS here) left the probabilities
    of a trained network near 0.5 on our digits trials (no polarisation, 10-26% test accuracy
    after removal at 50% FLOPs); the constant pull separates them, but overshoots: the
    expected cost ends below the target (``info["budget"]["expected_end"]``) and the allocator
    then keeps the likeliest channels up to the budget.
  * The parameters that drive the masks (the bound BN's ``gamma`` and ``beta``, the free
    logits) train at their own learning rate ``mask_lr`` (default 1.0, on the training
    schedule; None: the weights' rate). The paper trains everything from scratch at one rate;
    starting from a trained network at the fine-tuning rate (0.01) the probabilities hardly
    moved in 10 digits epochs (19% after removal), at ``mask_lr`` 0.1 / 0.3 / 1.0 they
    separated enough for 33% / 75% / 82% (small CNN on digits, 50% FLOPs, no fine-tune;
    the same budget by L2 norm plus 10 fine-tune epochs: 98%, DAIS: 99%).
  * Groups that are not BN -> ReLU (residual sums, whose ReLU follows an addition, layers
    without BN, other activations) get a plain learned logit: keep probability
    ``sigmoid(logit)``, the same relaxed mask, starting at ``init = 0`` (probability 0.5, where
    the BN-driven probabilities of a network with ``beta`` near 0 start, so that all groups
    compete on one scale); ``info["logit_groups"]`` lists them. The paper
    does not say how it handles them. A group gated at several BN -> ReLU pairs is taken as
    dead only where all are (the pairs as independent).
  * The paper trains the network with the masks from the start; here the method starts from
    the given (usually trained) network and trains ``epochs`` epochs with the default
    fine-tuning schedule (:func:`prunekit.methods._training.default_train_config`) unless
    ``train_config`` says otherwise.
  * The final selection is the allocator's exact budget, not a probability threshold, so the
    result always lands on the budget even if training has not driven the expected cost there
    (``info["budget"]`` reports both).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.gates import GateSet, attach_gates, prune_with_gates
from prunekit.gates.scp import ScpGate
from prunekit.methods import MethodResult, budget_config, register
from prunekit.methods._training import (
    ExpectedCost,
    Trajectory,
    bn_relu_modules,
    budget_report,
    check_loader,
    gate_snapshot,
    inverse_positions,
    own_param_group,
    split_options,
    training_config,
    working_copy,
)
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig
from prunekit.recover.train import train


@dataclasses.dataclass(frozen=True)
class ScpOptions:
    """SCP's knobs: ``budget_weight`` (weight of the expected-cost term), ``temperature``
    (of the relaxed Bernoulli masks), ``init`` (initial logit of the groups without
    BN -> ReLU: 0 keeps 50%) and ``mask_lr`` (learning rate of the parameters that drive the
    masks; None: the optimizer's)."""

    budget_weight: float = 1.0
    temperature: float = 0.5
    init: float = 0.0
    mask_lr: float | None = 1.0

    def __post_init__(self) -> None:
        """Check the values (ValueError naming the option)."""
        if self.budget_weight < 0:
            raise ValueError(f"scp: budget_weight={self.budget_weight} must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"scp: temperature={self.temperature} must be > 0")
        if self.mask_lr is not None and self.mask_lr < 0:
            raise ValueError(f"scp: mask_lr={self.mask_lr} must be >= 0 or None")


def bind_to_batchnorm(model: nn.Module, graph: Any, gates: GateSet) -> tuple[list[str], list[str]]:
    """Bind every ``scp`` gate whose sites are all BatchNorm layers feeding only ReLU ops to
    those layers; returns ``(names of bound groups, names of groups left with their own
    logit)``."""
    bn_relu = bn_relu_modules(graph)
    bound, unbound = [], []
    for g in gates.groups:
        if str(g.index) not in gates.gates:
            continue
        gate = gates.gate(g.index)
        assert isinstance(gate, ScpGate)
        norms = []
        for name, mod, index in gates.sites(g.index):
            pos = inverse_positions(index, g.size) if name in bn_relu else None
            if pos is None or not isinstance(getattr(mod, "bias", None), Tensor):
                norms = []
                break
            norms.append((mod, torch.as_tensor(pos)))
        if norms:
            gate.bind(norms)
            bound.append(g.name)
        else:
            unbound.append(g.name)
    return bound, unbound


class _ScpTraining(Callback):
    """Draws every gate's mask noise before each step and adds the expected-cost term; the
    parameters that drive the masks (bound BN affine parameters, free logits) train at
    ``mask_lr`` (None: the optimizer's)."""

    def __init__(self, gates: GateSet, term: ExpectedCost, weight: float, mask_lr: float | None = None) -> None:
        self.gates, self.term, self.weight, self.mask_lr = gates, term, weight, mask_lr

    def mask_parameters(self) -> list[nn.Parameter]:
        """The bound BN layers' weight and bias and the free logits, each once."""
        params: dict[int, nn.Parameter] = {}
        for gate in self.gates.gates.values():
            assert isinstance(gate, ScpGate)
            for mod, _ in gate._norms:
                params.setdefault(id(mod.weight), mod.weight)
                params.setdefault(id(mod.bias), mod.bias)
            if not gate.bound:
                params.setdefault(id(gate.logit), gate.logit)
        return list(params.values())

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Move the mask parameters into their own param group at ``mask_lr`` (done the same
        way on a resume, before the optimizer state is loaded, so the groups match)."""
        if self.mask_lr is not None:
            own_param_group(optimizer, self.mask_parameters(), self.mask_lr)

    def on_batch_start(self, model: nn.Module, step: int) -> None:
        """One relaxed-Bernoulli draw per channel for this step (all sites and samples share it)."""
        for gate in self.gates.gates.values():
            gate.resample()  # type: ignore[operator]

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """``weight * expected cost / target`` at the keep probabilities."""
        if not self.weight:
            return None
        frac = self.term.fraction(self.gates.mask(self.term.cost.groups))
        return (self.weight * frac / self.term.target).to(batch[0].device, torch.float32)


@register("scp")
def scp(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
        val_loader: Iterable[Any] | None = None, epochs: int | None = None, train_config: TrainConfig | None = None,
        run_dir: Any = None, resume: bool = False, batches: int | None = None, progress: bool = False,
        options: ScpOptions | None = None, **kwargs: Any) -> MethodResult:
    """Train ``model``'s copy with SCP masks for ``epochs`` epochs of ``loader`` and prune it
    to the budget in ``kwargs`` by the learned keep probabilities.

    ``options`` (:class:`ScpOptions`) or its fields as keywords set the method's knobs; the
    other keywords are budget options (:func:`prunekit.methods.budget_config`).
    ``val_loader`` is evaluated after every epoch (metrics in ``info["train"]["history"]``).
    ``run_dir``/``resume``: checkpoints of :func:`prunekit.recover.train` (weights, masks'
    temperature, schedules, RNG), so a killed run resumes exactly. Returns the pruned model
    (eval mode), its plan and ``info``: the groups driven by BN -> ReLU and those with a plain
    logit, the per-epoch trajectory (keep fraction per group, expected cost against the
    target), the budget report and the training history. Raises :class:`PruningError`
    without ``loader`` or for unknown options."""
    opts, rest = split_options(kwargs, ScpOptions, options, "scp")
    cfg = budget_config(rest, "scp")
    loader = check_loader(loader, "scp")
    tcfg = training_config(train_config, epochs, batches)
    work = working_copy(model, example_inputs, cfg)
    gates = attach_gates(work.model, work.graph, kind="scp", temperature=opts.temperature, init=opts.init)
    bound, unbound = bind_to_batchnorm(work.model, work.graph, gates)
    term = ExpectedCost(work.cost, work.config)
    trajectory = Trajectory(lambda: gate_snapshot(gates, gates.groups, term))
    result = train(work.model, loader, tcfg, val_loader=val_loader, run_dir=run_dir, resume=resume, progress=progress,
                   callbacks=[_ScpTraining(gates, term, opts.budget_weight, opts.mask_lr), trajectory])
    work.model.eval()
    with torch.no_grad():
        end_mask = gates.mask(work.cost.groups)
    small, plan = prune_with_gates(work.model, example_inputs, gates, work.graph, config=work.config)
    small.eval()
    info = {"method": "scp", "options": dataclasses.asdict(opts), "bn_relu_groups": bound,
            "logit_groups": unbound,
            "logit_groups_note": "groups without BatchNorm -> ReLU: a plain learned logit drives their mask",
            "trajectory": trajectory.history, "budget": budget_report(work, term, plan, small, example_inputs, end_mask),
            "train": {"epochs": result.epochs_completed, "resumed_from_epoch": result.resumed_from_epoch,
                      "history": result.history}}
    return MethodResult(small, plan, info)


scp.trains = True  # type: ignore[attr-defined]
