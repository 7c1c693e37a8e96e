"""AutoPruner: an end-to-end trainable channel-selection layer (Luo & Wu, Pattern Recognition
2020; arXiv 1805.08941).

What the paper does, and how this module does it:

  1. **Channel-selection layer.** After the activation of a layer, mini-batch pooling (the
     mean of the activation over the batch and the spatial positions) -> FC -> scaled sigmoid
     ``v = sigmoid(alpha * x)`` gives a code ``v`` in (0, 1) per channel that multiplies the
     channels. Here every coupled group gets an ``autopruner`` gate
     (:class:`prunekit.gates.autopruner.AutoPrunerGate`) through :func:`prunekit.gates.attach_gates`;
     it sits after the group's BatchNorm and, where that BN feeds a ReLU (read off the trace),
     pools the ReLU's output (``v >= 0``, so scaling before the ReLU is scaling after it).
  2. **Binarisation.** ``alpha`` grows during training so that ``v`` becomes binary. Here
     ``alpha`` rises linearly from ``alpha_start`` (1) to ``alpha_end`` (100) over each layer's
     training steps (the authors' ResNet-50 schedule, ``linspace(1, 100)``), set before every
     step by a training callback whose state (and the gates' buffers) the checkpoints keep.
  3. **Loss.** Task loss plus ``lambda * (||v||_1 / C - r)^2`` per layer being trained, ``v``
     the code of the current mini-batch and ``r`` the target keep rate: here ``reg`` is
     ``lambda`` (10, the authors' initial value) and ``r`` is ``keep_rate``, by default the
     uniform keep rate that puts the cost model's expected budget (FLOPs for
     ``target_flops``, params / latency, or the channel fraction for ``ratio``) on the
     target. The weights train jointly with the selection layers (the gradient of the
     pooling reaches the network, as in the paper).
  4. **Layer by layer.** The paper trains one layer's selection at a time (the authors'
     ResNet-50 code: one stage at a time), prunes it, then goes to the next.
     ``layer_by_layer=True`` (default) splits the training steps evenly over the gated groups
     in forward order (with fewer steps than groups, consecutive groups share a step); a group
     waits with code 1, is trained in its span, then is frozen to its binary code, which
     multiplies it for the rest of training (the function of the pruned layer: a channel
     multiplied by 0 everywhere is a removed channel). ``layer_by_layer=False`` trains all
     groups' selections at once over all steps (the 3rd-party summary's end-to-end variant).
  5. **Removal and fine-tune.** Channels whose code is 0 are removed, then the compact network
     is fine-tuned. Here the final selection is done by the ordinary allocator
     (:func:`prunekit.gates.prune_with_gates`) from the gates' binary codes, ties broken by
     their running logits ``alpha * x``, ranked across all groups (``global_ranking="raw"``),
     so the budget holds within one channel with ``round_to``, ``min_channels`` and
     ``ignore``; the frozen code-0 channels go first (see the departures), so up to rounding
     the removed channels are the code-0 ones. Kept channels are not scaled (their binary
     code is 1: nothing is folded). Then ``finetune_epochs`` epochs (default 1) of the
     training configuration on ``loader``.

Departures from the paper (its method section was not available to us; the mechanics come
from the third-party summary in ``PAPERS.md`` #13 and the authors' public code):

  * Pooling is over batch *and* space before the FC (as the summary and the issue describe);
    the authors' VGG/ResNet code pools over the batch, max-pools 2x2 and applies a conv over
    the whole remaining map (an FC over ``C x H/2 x W/2``), which ties the layer to one input
    size. Their FC-layer variant is ours.
  * ``alpha`` rises every step (the authors' code updates it every 100 iterations) and without
    the authors' adaptive extras: their code adds 1 to ``alpha`` whenever fewer than 90% of
    the codes are within 0.2 of 0 or 1, or the binary pruning rate passes a threshold that
    falls by 5 points each time ("gradual erasing"), and re-sets ``lambda`` every 20 steps
    to ``100 * |binary pruning rate - (1 - r)|``. Here ``lambda`` is constant and the budget is
    reached by the allocator, not by those controls.
  * The code in evaluation is the running mean of the training codes (momentum 0.1) while a
    layer trains, and its binary code once frozen; the authors evaluate with a binary code
    voted over the last 20 iterations.
  * When a layer's span ends its binary code keeps exactly the ``round(r * n)`` prunable
    channels with the highest running logit (at least one), not the channels whose code
    ended at 1: the authors steer ``lambda`` and ``alpha`` until the binary code keeps ``r``;
    here the rate is imposed at the freeze (``info["frozen"]`` records, per layer, how many the
    code's own sign kept and how binary its last code was). So the frozen codes' expected cost
    is the budget, and the allocator, which ranks every code-0 channel below every code-1
    channel, removes the code-0 channels and adjusts at the margin.
  * The paper prunes a layer physically before training the next; here it is masked by its
    binary code (the same function) and everything is removed at once at the end.
  * Groups coupled through a residual sum (which the paper does not prune: its ResNet-50
    prunes the bottlenecks' inner convs) get one code, computed from the activation at the
    group's first site in forward order (e.g. the stem) and applied at all its sites.
  * One keep rate ``r`` for all layers, derived from the budget; the paper gives ``r`` per
    run (0.5 / 0.3) and the authors' VGG code lowers it for one layer.
  * The selection FC's bias starts at ``init = 2`` (codes about 0.88 at ``alpha = 1``), its
    weights at PyTorch's default (as the authors' FC variant, whose bias is PyTorch's
    default too, codes about 0.5): a trained network then starts near its own function and
    the keep-rate term pulls the codes down, against the task loss where a channel matters.
    On the planted net below, ``init=None`` left the dead channel in 11 of 12 all-at-once runs
    (layer by layer: 12 of 12 right). The FCs are drawn under the training seed.
  * The network is the given (usually trained) one, trained with the default fine-tuning
    schedule unless ``train_config`` says otherwise (the authors fine-tune at lr 1e-3 per
    layer); ``selection_lr`` optionally gives the selection layers their own rate.

Measured (``tests/learned_nets.planted(norm=False)``: 8 channels, a dead one and one worth 3x
the others, 30% removed, 12 epochs of 4 batches of 16, 12 training seeds): layer by layer the
dead channel went and the important one stayed in 12 of 12 runs, all at once in 11 of 12. On
the same net with a training-mode BatchNorm after the layer (``planted()``) only 3 and 4 of
12 runs were right, most keeping the dead channel: behind such a BN the task loss does not
depend on the layer's overall scale, so the codes' gradients have mixed signs and a channel
nothing reads (gradient 0) ranks in the middle; the keep-rate term pulls every code alike.
The paper's networks have that BN; the signal it needs there is the task's preference among
the live channels.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.gates import GateSet, attach_gates, prune_with_gates
from prunekit.gates.autopruner import ACTIVE, FROZEN, WAITING, AutoPrunerGate
from prunekit.methods import MethodResult, budget_config, register
from prunekit.methods._training import (
    ExpectedCost,
    Trajectory,
    binary_fraction,
    budget_report,
    check_loader,
    gate_snapshot,
    own_param_group,
    relu_fed_modules,
    split_options,
    training_config,
    working_copy,
)
from prunekit.errors import PruningError
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig
from prunekit.recover.train import steps_per_epoch, train


@dataclasses.dataclass(frozen=True)
class AutoPrunerOptions:
    """AutoPruner's knobs: ``layer_by_layer`` (the paper's one layer at a time, or all at
    once), ``keep_rate`` (``r``; None: the uniform rate that meets the budget), ``reg``
    (``lambda`` of the keep-rate term), ``alpha_start``/``alpha_end`` (the scaled sigmoid's
    schedule over each layer's steps), ``init`` (bias of the selection FC, 2: first codes
    about 0.88; None: PyTorch's default, codes about 0.5), ``momentum`` (of the running
    code), ``selection_lr`` (the selection layers' own learning rate; None: the optimizer's)
    and ``finetune_epochs`` after removal."""

    layer_by_layer: bool = True
    keep_rate: float | None = None
    reg: float = 10.0
    alpha_start: float = 1.0
    alpha_end: float = 100.0
    init: float | None = 2.0
    momentum: float = 0.1
    selection_lr: float | None = None
    finetune_epochs: int = 1

    def __post_init__(self) -> None:
        """Check the values (ValueError naming the option)."""
        if self.keep_rate is not None and not 0 < self.keep_rate <= 1:
            raise ValueError(f"autopruner: keep_rate={self.keep_rate} must be in (0, 1] or None")
        if self.reg < 0:
            raise ValueError(f"autopruner: reg={self.reg} must be >= 0")
        if not 0 < self.alpha_start <= self.alpha_end:
            raise ValueError(f"autopruner: need 0 < alpha_start <= alpha_end, got {self.alpha_start} and "
                             f"{self.alpha_end}")
        if not 0 < self.momentum <= 1:
            raise ValueError(f"autopruner: momentum={self.momentum} must be in (0, 1]")
        if self.selection_lr is not None and self.selection_lr < 0:
            raise ValueError(f"autopruner: selection_lr={self.selection_lr} must be >= 0 or None")
        if self.finetune_epochs < 0:
            raise ValueError(f"autopruner: finetune_epochs={self.finetune_epochs} must be >= 0")


def uniform_keep_rate(term: ExpectedCost, gated: set[int]) -> float:
    """The keep rate ``r`` that, given to every prunable channel of the groups in ``gated``
    (group indices; the others kept whole), puts ``term``'s expected fraction on its target
    (bisection on the cost model; 1 when the whole model is within the target, the smallest
    rate tried when even that is above it)."""
    parts = [torch.as_tensor(g.prunable, dtype=torch.bool) if g.index in gated
             else torch.zeros(g.size, dtype=torch.bool) for g in term.cost.groups]
    sel = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def fraction(r: float) -> float:
        mask = torch.ones(sel.numel(), dtype=torch.float64)
        mask[sel] = r
        return float(term.fraction(mask))

    lo, hi = 1e-3, 1.0
    if fraction(hi) <= term.target:
        return hi
    if fraction(lo) >= term.target:
        return lo
    for _ in range(50):  # the fraction grows with r
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fraction(mid) < term.target else (lo, mid)
    return 0.5 * (lo + hi)


def layer_spans(groups: int, steps: int, layer_by_layer: bool) -> list[tuple[int, int]]:
    """``(first, last)`` training step (1-based, inclusive) of each of ``groups`` layers:
    all ``(1, steps)`` at once, or consecutive equal shares of ``steps`` layer by layer (with
    fewer steps than layers, consecutive layers share a step). Raises PruningError without
    steps."""
    if steps < 1:
        raise PruningError("method 'autopruner': the loader gives no training steps")
    if not layer_by_layer:
        return [(1, steps)] * groups
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for s in range(1, steps + 1):
        lo = (s - 1) * groups // steps
        for k in range(lo, max(lo + 1, s * groups // steps)):
            first.setdefault(k, s)
            last[k] = s
    return [(first[k], last[k]) for k in range(groups)]


def selection_layers(model: nn.Module, graph: Any, opts: AutoPrunerOptions, seed: int) -> GateSet:
    """Attach an ``autopruner`` gate to every prunable group of ``graph`` on ``model`` (waiting
    when ``opts.layer_by_layer``, else active), its FC drawn under ``seed``, pooling the ReLU
    of its activation where its first site feeds ReLU ops only. Returns the gate set."""
    # Drawn from the training seed, not from whatever the global RNG holds, so that a run (and
    # its resume) starts from the same layers; the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gates = attach_gates(model, graph, kind="autopruner", alpha=opts.alpha_start, init=opts.init,
                             momentum=opts.momentum, state=WAITING if opts.layer_by_layer else ACTIVE)
    relu_fed = relu_fed_modules(graph)
    for g in gates.forward_order():
        gate = gates.gate(g.index)
        assert isinstance(gate, AutoPrunerGate)
        gate.relu = gates.sites(g.index)[0][0] in relu_fed  # the code is computed at site 0
    return gates


class _Selection(Callback):
    """Drives the selection layers: before every step activates the layers whose span has
    come and sets their ``alpha`` (linear from ``alpha_start`` to ``alpha_end`` over the
    span); adds ``reg * (mean(v) - r)^2`` for every layer that computed a code in this pass;
    after the last step of a span freezes its layers to their binary codes, recording how
    binary the codes were."""

    def __init__(self, gates: GateSet, order: list[Any], spans: list[tuple[int, int]], opts: AutoPrunerOptions,
                 keep_rate: float) -> None:
        self.gates, self.order, self.spans, self.opts, self.keep_rate = gates, order, spans, opts, keep_rate
        self.frozen: dict[str, dict[str, Any]] = {}

    def gate(self, k: int) -> AutoPrunerGate:
        """The gate of the ``k``-th group in forward order."""
        gate = self.gates.gate(self.order[k].index)
        assert isinstance(gate, AutoPrunerGate)
        return gate

    def alpha(self, k: int, step: int) -> float:
        """``alpha`` of layer ``k`` at ``step`` (its span's start value before, end value after)."""
        first, last = self.spans[k]
        progress = min(max((step - first) / max(1, last - first), 0.0), 1.0)
        return self.opts.alpha_start + (self.opts.alpha_end - self.opts.alpha_start) * progress

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put the selection layers' parameters in their own param group at ``selection_lr``
        (when set; also on a resume, before the optimizer state is loaded)."""
        if self.opts.selection_lr is not None:
            own_param_group(optimizer, [p for k in range(len(self.spans)) for p in self.gate(k).parameters()],
                            self.opts.selection_lr)

    def on_batch_start(self, model: nn.Module, step: int) -> None:
        """Activate and schedule the layers of this step; freeze any whose span is over."""
        for k, (first, last) in enumerate(self.spans):
            gate = self.gate(k)
            gate.code = None
            if first <= step <= last:
                gate.state.fill_(ACTIVE)
                gate.alpha.fill_(self.alpha(k, step))
            elif step > last and int(gate.state) != FROZEN:
                self._freeze(k, step - 1)

    def extra_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        """``reg * sum over trained layers of (mean code - r)^2`` (None when none trains)."""
        terms = [(g.code.mean() - self.keep_rate) ** 2 for g in (self.gate(k) for k in range(len(self.spans)))
                 if int(g.state) == ACTIVE and g.code is not None]
        if not terms or not self.opts.reg:
            return None
        return self.opts.reg * torch.stack(terms).sum().to(batch[0].device, torch.float32)

    def on_step(self, model: nn.Module, step: int) -> None:
        """Freeze the layers whose span ends with this step."""
        for k, (_, last) in enumerate(self.spans):
            if last == step and int(self.gate(k).state) != FROZEN:
                self._freeze(k, step)

    def _freeze(self, k: int, step: int) -> None:
        """Freeze layer ``k`` to the ``round(r * n)`` prunable channels of highest running
        logit (the others of its group always kept), recording how binary its last code was
        and how many channels the code's own sign kept."""
        gate, group = self.gate(k), self.order[k]
        prunable = torch.as_tensor(group.prunable, dtype=torch.bool)
        n = int(prunable.sum())
        logit = gate.running_logit.detach().double().cpu()
        order = torch.argsort(torch.where(prunable, logit, torch.tensor(float("inf"), dtype=torch.float64)))
        code = torch.ones(gate.size)
        code[order[:n - max(1, round(self.keep_rate * n))]] = 0.0  # the lowest-logit prunable channels
        record = {"step": step, "alpha": float(gate.alpha), "binary_fraction": binary_fraction(gate.last_code),
                  "mean_code": float(gate.last_code.double().mean()), "sign_kept": int(gate.sign_code().sum())}
        gate.freeze(code)
        record["kept"] = int(gate.frozen.sum())
        self.frozen[group.name] = record

    def on_train_end(self, model: nn.Module) -> None:
        """Drop the last pass's codes (tensors with a graph)."""
        for k in range(len(self.spans)):
            self.gate(k).code = None

    def state_dict(self) -> dict[str, Any]:
        """Every layer's ``alpha`` and the records of the frozen layers."""
        return {"alpha": [float(self.gate(k).alpha) for k in range(len(self.spans))],
                "frozen": copy.deepcopy(self.frozen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``alpha`` (also in the gates' buffers) and the records."""
        for k, a in enumerate(state.get("alpha", [])):
            self.gate(k).alpha.fill_(float(a))
        self.frozen = copy.deepcopy(dict(state.get("frozen", {})))


def _snapshot(gates: GateSet, selection: _Selection, term: ExpectedCost) -> dict[str, Any]:
    """The shared gate snapshot plus each layer's ``alpha`` and life-cycle state."""
    names = {WAITING: "waiting", ACTIVE: "active", FROZEN: "frozen"}
    snap = gate_snapshot(gates, gates.groups, term)
    snap["alpha"] = {g.name: float(selection.gate(k).alpha) for k, g in enumerate(selection.order)}
    snap["state"] = {g.name: names[int(selection.gate(k).state)] for k, g in enumerate(selection.order)}
    return snap


@register("autopruner")
def autopruner(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None,
               val_loader: Iterable[Any] | None = None, epochs: int | None = None,
               train_config: TrainConfig | None = None, run_dir: Any = None, resume: bool = False,
               batches: int | None = None, progress: bool = False, options: AutoPrunerOptions | None = None,
               **kwargs: Any) -> MethodResult:
    """Train AutoPruner channel-selection layers with ``model``'s copy for ``epochs`` epochs of
    ``loader`` (layer by layer or all at once), remove the channels they close to the budget
    in ``kwargs`` and fine-tune ``finetune_epochs`` epochs.

    ``options`` (:class:`AutoPrunerOptions`) or its fields as keywords set the method's knobs;
    the other keywords are budget options (:func:`prunekit.methods.budget_config`).
    ``val_loader`` is evaluated after every epoch. ``run_dir``/``resume``: checkpoints of both
    phases (the fine-tune's in ``run_dir/finetune``; weights, selection layers and their
    ``alpha`` and state, RNG), so a killed run resumes exactly. Returns the pruned (and
    fine-tuned) model in eval mode, its plan and ``info``: the keep rate ``r``, each layer's
    span and freeze record (step, ``alpha``, fraction of codes within 0.01 of 0 or 1, channels
    kept), ``binary_fraction`` over all layers' last codes, the per-epoch trajectory, the
    budget report and the training histories. Raises :class:`PruningError` without
    ``loader`` or for unknown options."""
    opts, rest = split_options(kwargs, AutoPrunerOptions, options, "autopruner")
    cfg = budget_config(rest, "autopruner")
    loader = check_loader(loader, "autopruner")
    tcfg = training_config(train_config, epochs, batches)
    work = working_copy(model, example_inputs, cfg)
    gates = selection_layers(work.model, work.graph, opts, tcfg.seed)
    order = gates.forward_order()
    term = ExpectedCost(work.cost, work.config)
    keep_rate = opts.keep_rate if opts.keep_rate is not None else uniform_keep_rate(term, {g.index for g in order})
    spans = layer_spans(len(order), tcfg.epochs * steps_per_epoch(loader, tcfg), opts.layer_by_layer)
    selection = _Selection(gates, order, spans, opts, keep_rate)
    trajectory = Trajectory(lambda: _snapshot(gates, selection, term))
    result = train(work.model, loader, tcfg, val_loader=val_loader, run_dir=run_dir, resume=resume, progress=progress,
                   callbacks=[selection, trajectory])
    work.model.eval()
    with torch.no_grad():
        end_mask = gates.mask(work.cost.groups)
        codes = torch.cat([selection.gate(k).last_code for k in range(len(order))]) if order else torch.ones(0)
    # The binary codes of the kept channels are 1: nothing to fold (fold=False keeps them exact).
    small, plan = prune_with_gates(work.model, example_inputs, gates, work.graph, fold=False, config=work.config)
    tuned = None
    if opts.finetune_epochs:
        sub = Path(run_dir) / "finetune" if run_dir is not None else None
        tuning = train(small, loader, dataclasses.replace(tcfg, epochs=opts.finetune_epochs), val_loader=val_loader,
                       run_dir=sub, resume=resume, progress=progress)
        tuned = {"epochs": tuning.epochs_completed, "resumed_from_epoch": tuning.resumed_from_epoch,
                 "history": tuning.history}
    small.eval()
    info = {"method": "autopruner", "options": dataclasses.asdict(opts), "keep_rate": keep_rate,
            "layers": [{"group": g.name, "first_step": a, "last_step": b} for g, (a, b) in zip(order, spans)],
            "frozen": selection.frozen, "binary_fraction": binary_fraction(codes),
            "indicator_data": "loader (selection layers trained jointly with the weights)",
            "ungated_groups": list(gates.ungated),
            "trajectory": trajectory.history,
            "budget": budget_report(work, term, plan, small, example_inputs, end_mask),
            "train": {"epochs": result.epochs_completed, "resumed_from_epoch": result.resumed_from_epoch,
                      "history": result.history},
            "finetune": tuned}
    return MethodResult(small, plan, info)


autopruner.trains = True  # type: ignore[attr-defined]
