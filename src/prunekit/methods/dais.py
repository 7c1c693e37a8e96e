"""DAIS: differentiable annealing indicator search (Guan et al., IEEE TNNLS 2023; arXiv 2011.02166).

What the paper does, and how this module does it:

  1. **Indicators.** Every channel has an indicator ``alpha_c``, relaxed as
     ``I_c = sigmoid(alpha_c / T)``, that multiplies the channel. Here each coupled group gets
     one ``logit`` gate (:mod:`prunekit.gates`): residual-coupled channels (every layer feeding
     one sum) share an indicator because the group is their unit.
  2. **Annealing.** ``T`` falls towards 0 during the search so that the indicators become
     binary. Here ``T = T0 / (1 + (T0 / T_end - 1) * s / S)`` after step ``s`` of ``S``
     (``T0 = 1``, ``T_end = 0.02``: the ``1 / (1 + 49 e / E)`` schedule), written into the
     gates' temperature buffers, so checkpoints keep it.
  3. **Bi-level search (DARTS, first order).** The weights are trained on the training split,
     the indicators on a held-out split. Here every optimizer step of
     :func:`prunekit.recover.train` on a training batch (weights only: the indicators are left
     out of its optimizer) is followed by one Adam step of the indicators on a batch of
     ``val_loader`` (betas 0.5/0.999 as DARTS; ``indicator_lr``), cycling through it.
  4. **Regularisers.** The indicator step's loss is the task loss plus ``l1`` times the mean
     indicator (the L1 term, normalised by the number of channels) plus ``budget_weight *
     |log(E[cost] / target)|``, the expected cost of the indicators from the cost model
     (:class:`prunekit.allocate.cost.CostModel`): FLOPs for ``target_flops``, params / latency /
     the kept channel fraction for the other budgets.
  5. **Binarise.** The paper keeps the channels whose indicator ends above 0.5. Here the
     indicators' logits (``alpha / T``) are the scores of the ordinary allocator
     (:func:`prunekit.gates.prune_with_gates`), ranked across all groups on their one scale
     (``global_ranking="raw"``), which meets the budget exactly; once the
     search has converged that is the same set. ``info["binary_fraction"]`` is the fraction of
     indicators within 0.01 of 0 or 1 at the end.

Departures from the paper (only its abstract and an unofficial reimplementation were
available, see ``PAPERS.md`` #11; the exact formulas are unverified):

  * The structural prior for residual blocks (a term on whole blocks) is not implemented;
    coupled channels share their indicator instead.
  * The form of the budget term (the log-ratio, two-sided) and of the L1 term (a mean) are
    our reading of the reimplementation; weights and learning rates are ours.
  * Without ``val_loader`` the indicator steps take every other batch of ``loader`` (the
    weights the rest), which is not a held-out split: over epochs the same images reach both
    steps. ``info["indicator_data"]`` says which was used.
  * BatchNorm is in training mode during the indicator steps (as in DARTS), so its running
    statistics also follow the held-out batches.
  * The search starts from the given (usually trained) network, indicators at
    ``sigmoid(init)`` (0.73), and trains ``epochs`` epochs with the default fine-tuning
    schedule; no retraining after the search (the issue's design: the result is trained).
  * Under ``torchrun`` the indicator gradients are averaged over the ranks by hand (the
    indicator step runs outside DistributedDataParallel); two gloo processes end with the same
    indicators and weights (``tests/methods/test_methods_ddp.py``).

Measured (small CNN on scikit-learn's digits, trained to 98.6%, 10 epochs, 200 held-out
images as ``val_loader``, default options): 99.4% test accuracy at 49.6% of the FLOPs with no
fine-tuning (the same budget by L2 norm: 33% before and 98.3% after 10 fine-tune epochs);
all indicators ended within 0.01 of 0 or 1 and their expected FLOPs (50.3%) within 0.7 points
of the pruned model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    gate_snapshot,
    split_options,
    training_config,
    working_copy,
)
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig
from prunekit.recover.distributed import average_gradients
from prunekit.recover.train import steps_per_epoch, train
from prunekit.runtime import infer_device


@dataclasses.dataclass(frozen=True)
class DaisOptions:
    """DAIS's knobs: the indicators' Adam learning rate, the L1 and budget weights of their
    loss, the temperature schedule's start and end and the indicators' initial logit."""

    indicator_lr: float = 0.05
    l1: float = 0.1
    budget_weight: float = 1.0
    start_temperature: float = 1.0
    end_temperature: float = 0.02
    init: float = 1.0

    def __post_init__(self) -> None:
        """Check the values (ValueError naming the option)."""
        for key in ("indicator_lr", "l1", "budget_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"dais: {key}={getattr(self, key)} must be >= 0")
        if not 0 < self.end_temperature <= self.start_temperature:
            raise ValueError(f"dais: need 0 < end_temperature <= start_temperature, got {self.end_temperature} "
                             f"and {self.start_temperature}")


class HeldOut:
    """Batches for the indicator steps, cycling through ``loader`` without end; its position
    and, for a loader with a generator (a shuffling DataLoader), the generator's state at the
    start of the current pass are its state, so a resumed run sees the same batches."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.pos = 0
        self.pass_state: Tensor | None = None
        self._it: Iterator[Any] | None = None

    def _start(self) -> None:
        gen = getattr(self.loader, "generator", None)
        if isinstance(gen, torch.Generator):
            if self.pass_state is None:
                self.pass_state = gen.get_state()
            else:
                gen.set_state(self.pass_state)
        self._it = iter(self.loader)
        for _ in range(self.pos):  # on resume: skip what the interrupted run had taken
            next(self._it)

    def next(self) -> Any:
        """The next batch (a new pass starts where the last one ended)."""
        if self._it is None:
            self._start()
        assert self._it is not None
        try:
            batch = next(self._it)
        except StopIteration:
            self.pos, self.pass_state = 0, None
            self._start()
            try:
                batch = next(self._it)
            except StopIteration:
                raise ValueError("dais: the held-out loader yields no batches") from None
        self.pos += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Position in the current pass and the generator state it started from."""
        return {"pos": self.pos, "pass_state": self.pass_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position (the pass is rebuilt on the next batch)."""
        self.pos, self.pass_state, self._it = int(state["pos"]), state.get("pass_state"), None


class Alternate:
    """``loader`` with every other batch held back for the indicator steps: iterating yields
    batches 0, 2, 4, ... and leaves the following odd batch in :attr:`held` (None when the
    epoch has no batch left for it). ``generator``/``sampler`` are the loader's, so the
    training loop restores and reshuffles it as usual."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.held: Any = None

    @property
    def generator(self) -> Any:
        """The wrapped loader's generator (None if it has none)."""
        return getattr(self.loader, "generator", None)

    @property
    def sampler(self) -> Any:
        """The wrapped loader's sampler (None if it has none)."""
        return getattr(self.loader, "sampler", None)

    def __len__(self) -> int:
        return (len(self.loader) + 1) // 2  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        for batch in it:
            self.held = next(it, None)
            yield batch
        self.held = None

    def take(self) -> Any:
        """The batch held back after the current training batch (once), or None."""
        batch, self.held = self.held, None
        return batch


class _IndicatorSearch(Callback):
    """After every weight step: anneal the temperature, then one indicator step on a held-out batch."""

    def __init__(self, gates: GateSet, term: ExpectedCost, opts: DaisOptions, total_steps: int,
                 source: HeldOut | Alternate) -> None:
        self.gates, self.term, self.opts, self.total = gates, term, opts, max(1, total_steps)
        self.source = source
        self.logits = [g.logit for g in gates.gates.values()]  # type: ignore[union-attr]
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The indicators get their own optimizer (they were left out of the weights')."""
        for p in self.logits:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.logits, lr=self.opts.indicator_lr, betas=(0.5, 0.999))

    def temperature(self, step: int) -> float:
        """The temperature after ``step`` of the run's optimizer steps."""
        return anneal(self.opts.start_temperature, self.opts.end_temperature, step / self.total)

    def on_step(self, model: nn.Module, step: int) -> None:
        """Set the temperature for the next forward passes, then update the indicators on one
        held-out batch (task loss + L1 + budget term); the weights' gradients of that pass are
        dropped (the next weight step starts from zero)."""
        for gate in self.gates.gates.values():
            gate.temperature.fill_(self.temperature(step))  # type: ignore[union-attr,operator]
        batch = self.source.take() if isinstance(self.source, Alternate) else self.source.next()
        if batch is None:
            return
        assert self.optimizer is not None
        x, y = batch[0], batch[1]
        device = infer_device(model)
        x, y = x.to(device), y.to(device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + self.regulariser()
        loss.backward()
        average_gradients(self.logits)  # this step runs outside DDP: average by hand
        self.optimizer.step()
        model.zero_grad(set_to_none=True)

    def regulariser(self) -> Tensor:
        """``l1 * mean indicator + budget_weight * |log(E[cost] / target)|`` (on the model's device)."""
        mask = self.gates.mask(self.term.cost.groups)
        values = torch.cat([g.values().reshape(-1) for g in self.gates.gates.values()])  # type: ignore[operator]
        reg = self.opts.budget_weight * budget_penalty(self.term.fraction(mask), self.term.target)
        return self.opts.l1 * values.mean() + reg.to(values.device, values.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The indicator optimizer's state and the held-out position."""
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}
        if isinstance(self.source, HeldOut):
            state["held_out"] = self.source.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the indicator optimizer and the held-out position."""
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if isinstance(self.source, HeldOut) and "held_out" in state:
            self.source.load_state_dict(state["held_out"])


@register("dais")
def dais(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
         val_loader: Iterable[Any] | None = None, epochs: int | None = None, train_config: TrainConfig | None = None,
         run_dir: Any = None, resume: bool = False, batches: int | None = None, progress: bool = False,
         options: DaisOptions | None = None, **kwargs: Any) -> MethodResult:
    """Search channel indicators with DAIS for ``epochs`` epochs (weights on ``loader``,
    indicators on ``val_loader``, or on every other batch of ``loader`` without one) and prune
    ``model``'s copy to the budget in ``kwargs`` by them.

    ``options`` (:class:`DaisOptions`) or its fields as keywords set the method's knobs; the
    other keywords are budget options (:func:`prunekit.methods.budget_config`).
    ``run_dir``/``resume``: checkpoints of :func:`prunekit.recover.train` (weights,
    indicators and their temperature, the indicator optimizer, the held-out position, RNG),
    so a killed run resumes exactly. Returns the pruned model (eval mode), its plan and
    ``info``: the per-epoch trajectory (keep fraction per group, expected cost against the
    target), ``binary_fraction``, the final temperature, which data the indicators were
    trained on, the budget report and the training history. Raises :class:`PruningError`
    without ``loader`` or for unknown options."""
    opts, rest = split_options(kwargs, DaisOptions, options, "dais")
    cfg = budget_config(rest, "dais")
    loader = check_loader(loader, "dais")
    tcfg = training_config(train_config, epochs, batches)
    work = working_copy(model, example_inputs, cfg)
    gates = attach_gates(work.model, work.graph, kind="logit", init=opts.init, temperature=opts.start_temperature)
    for gate in gates.gates.values():
        gate.logit.requires_grad_(False)  # type: ignore[union-attr]  # not the weights' optimizer's
    if val_loader is not None:
        source: HeldOut | Alternate = HeldOut(val_loader)
        weights_loader: Iterable[Any] = loader
        used = "val_loader (held out)"
    else:
        source = weights_loader = Alternate(loader)
        used = "every other batch of loader (no val_loader; not a held-out split)"
    term = ExpectedCost(work.cost, work.config)
    total = tcfg.epochs * steps_per_epoch(weights_loader, tcfg)
    search = _IndicatorSearch(gates, term, opts, total, source)
    trajectory = Trajectory(lambda: gate_snapshot(gates, gates.groups, term))
    result = train(work.model, weights_loader, tcfg, run_dir=run_dir, resume=resume, progress=progress,
                   callbacks=[search, trajectory])
    work.model.eval()
    with torch.no_grad():
        end_mask = gates.mask(work.cost.groups)
        values = torch.cat([g.values().reshape(-1) for g in gates.gates.values()])  # type: ignore[operator]
    temperature = float(next(iter(gates.gates.values())).temperature) if len(gates.gates) else None  # type: ignore[arg-type]
    small, plan = prune_with_gates(work.model, example_inputs, gates, work.graph, config=work.config)
    small.eval()
    info = {"method": "dais", "options": dataclasses.asdict(opts), "indicator_data": used,
            "binary_fraction": binary_fraction(values), "final_temperature": temperature,
            "kept_above_half": int((values > 0.5).sum()), "indicators": int(values.numel()),
            "trajectory": trajectory.history, "budget": budget_report(work, term, plan, small, example_inputs, end_mask),
            "train": {"epochs": result.epochs_completed, "resumed_from_epoch": result.resumed_from_epoch,
                      "history": result.history}}
    return MethodResult(small, plan, info)


dais.trains = True  # type: ignore[attr-defined]
