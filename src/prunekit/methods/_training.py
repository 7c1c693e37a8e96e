"""What the methods that prune while training share: the training convention, the expected
cost of soft masks against the budget, per-epoch trajectories, the final budget report and
the re-initialisation of a network retrained from scratch.

The convention (every method with ``trains = True``)::

    res = methods.get(NAME)(model, x, loader=train_loader, val_loader=None, epochs=E, train_config=None,
                            run_dir=None, resume=False, target_flops=0.5, ..., **method_options)

``loader`` is iterated for ``epochs`` epochs by :func:`prunekit.recover.train`;
``train_config`` defaults to :func:`default_train_config` (its ``epochs`` replaced by
``epochs`` when given; ``batches`` caps the steps per epoch); ``run_dir``/``resume`` go to
``train``, whose checkpoints hold the gates (model state) and the callbacks' schedules, so a
killed run resumes exactly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import prunekit as pk
from prunekit.allocate.cost import CostModel
from prunekit.config import PruneConfig
from prunekit.errors import PruningError
from prunekit.graph import module_names
from prunekit.recover.callbacks import Callback
from prunekit.recover.config import TrainConfig

DEFAULT_EPOCHS = 10


def default_train_config(epochs: int = DEFAULT_EPOCHS) -> TrainConfig:
    """The default of training methods: a fine-tune of a trained model (SGD, momentum 0.9,
    lr 0.01, cosine schedule, weight decay 5e-4) for ``epochs`` epochs."""
    return TrainConfig(epochs=epochs, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine", tensorboard=False)


def training_config(train_config: TrainConfig | None, epochs: int | None, batches: int | None) -> TrainConfig:
    """``train_config`` (default :func:`default_train_config`) with ``epochs`` and, as
    ``max_steps_per_epoch``, ``batches`` put in where given."""
    cfg = train_config if train_config is not None else default_train_config()
    changes: dict[str, Any] = {}
    if epochs is not None:
        changes["epochs"] = int(epochs)
    if batches is not None:
        changes["max_steps_per_epoch"] = int(batches)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def check_loader(loader: Iterable[Any] | None, method: str) -> Iterable[Any]:
    """``loader`` itself; None raises :class:`PruningError` (a training method needs data)."""
    if loader is None:
        raise PruningError(f"method '{method}' trains the network: pass loader=... (training batches of "
                           "(inputs, targets)) and epochs=")
    return loader


def split_options(kwargs: Mapping[str, Any], options_type: type, given: Any, method: str) -> tuple[Any, dict[str, Any]]:
    """Split a method's keywords into its options (fields of the frozen dataclass
    ``options_type``, over ``given`` or the defaults) and the rest (budget options)."""
    names = {f.name for f in dataclasses.fields(options_type)}
    own = {k: v for k, v in kwargs.items() if k in names}
    rest = {k: v for k, v in kwargs.items() if k not in names}
    base = given if given is not None else options_type()
    if not isinstance(base, options_type):
        raise PruningError(f"method '{method}': options must be a {options_type.__name__}, got {type(base).__name__}")
    return (dataclasses.replace(base, **own) if own else base), rest


@dataclasses.dataclass
class Work:
    """A method's working copy: the traced copy of the user's model, its cost model (built
    before any gate is attached) and the pruning options of the final selection: ``ignore``
    resolved into the graph (so ``config`` has ``ignore=None``) and ``global_ranking="raw"``
    (learned scores share one scale across groups: the papers' global threshold, with the
    allocator's per-group floor ``min_channels`` and its cap of 90% per group)."""

    model: nn.Module
    graph: Any
    cost: CostModel
    config: PruneConfig


def working_copy(model: nn.Module, example_inputs: Any, cfg: PruneConfig) -> Work:
    """Deep-copy ``model`` (the user's stays untouched), trace it with ``cfg.ignore`` (module
    objects of the original become the copy's names) and build its cost model; a latency
    budget gets its table measured once here, for the expected cost and the final pruning."""
    names = module_names(model, list(cfg.ignore), "ignore") if cfg.ignore else None
    work = copy.deepcopy(model)
    graph = pk.trace(work.eval(), example_inputs, ignore=names)
    table = cfg.latency_table
    if cfg.target is not None and cfg.target[0] == "latency" and table is None:
        from prunekit.measure.latency_table import build_latency_table

        table = build_latency_table(work, example_inputs)
    cost = CostModel(graph, work, example_inputs, latency_table=table)
    extra = {"latency_table": table} if table is not None else {}
    cfg = cfg.replace(ignore=None, global_ranking="raw", **extra)
    return Work(work, graph, cost, cfg)


class ExpectedCost:
    """The budgeted quantity of a keep mask as a fraction of the unpruned model's, and its
    target: FLOPs / params / latency from the cost model for a ``target_*`` budget, the
    fraction of prunable channels kept for a ``ratio`` (target ``1 - ratio``)."""

    def __init__(self, cost: CostModel, cfg: PruneConfig) -> None:
        self.cost = cost
        target = cfg.target
        self.kind, self.target = target if target is not None else ("channels", 1.0 - cfg.ratio)
        prunable = [torch.as_tensor(g.prunable, dtype=torch.bool) for g in cost.groups]
        self._prunable = torch.cat(prunable) if prunable else torch.zeros(0, dtype=torch.bool)

    def fraction(self, mask: Tensor) -> Tensor:
        """The expected kept fraction at ``mask`` (a cost-model mask, differentiable)."""
        if self.kind == "channels":
            sel = mask[self._prunable]
            return sel.mean() if sel.numel() else mask.new_ones(())
        return self.cost.measure(self.kind, mask) / self.cost.base(self.kind)

    def flops(self, mask: Tensor) -> float:
        """The expected kept fraction of FLOPs at ``mask`` (whatever the budget is)."""
        return float(self.cost.flops(mask.detach()) / self.cost.base_flops)


class Trajectory(Callback):
    """Records ``snapshot()`` (a JSON-able dict) after every epoch; the history is part of the
    callback's state, so a resumed run's trajectory is the uninterrupted one. Numbers under
    ``snapshot()["record"]`` also go into the epoch's training record (``train_log.jsonl``)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot
        self.history: list[dict[str, Any]] = []

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        """Append this epoch's snapshot and copy its ``record`` numbers into ``record``."""
        snap = {"epoch": epoch, **self.snapshot()}
        record.update(snap.pop("record", {}))
        self.history.append(snap)

    def state_dict(self) -> dict[str, Any]:
        """The recorded history."""
        return {"history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recorded history."""
        self.history = list(state.get("history", []))


def gate_snapshot(gates: Any, groups: list[Any], term: ExpectedCost) -> dict[str, Any]:
    """Keep fraction per gated group (mean expected gate value) and the expected budgeted
    quantity and FLOPs against the target, at the gates' current values."""
    with torch.no_grad():
        mask = gates.mask(term.cost.groups)
        keep = {g.name: float(gates.gate(g.index).expected_values().detach().double().mean())
                for g in groups if str(g.index) in gates.gates}
        frac = float(term.fraction(mask))
    return {"keep": keep, "expected": frac, "target": term.target, "expected_flops": term.flops(mask),
            "record": {f"expected_{term.kind}": frac}}


def binary_fraction(values: Tensor, tol: float = 0.01) -> float:
    """Fraction of ``values`` within ``tol`` of 0 or 1."""
    v = values.detach().double()
    return float(((v <= tol) | (v >= 1 - tol)).double().mean()) if v.numel() else 1.0


def budget_report(work: Work, term: ExpectedCost, plan: Any, small: nn.Module, example_inputs: Any,
                  end_mask: Tensor | None) -> dict[str, Any]:
    """What the run reached: the target, the expected fraction at the end of training
    (``end_mask``, the soft mask; None without one), the cost model at the selected plan's
    binary mask and the FLOPs / params counted on the pruned model, all as fractions of the
    original."""
    from prunekit.measure import count_flops, count_params

    cost = work.cost
    selected = cost.mask_of_plan(plan)
    out: dict[str, Any] = {"kind": term.kind, "target": term.target,
                           "selected": float(term.fraction(selected)),
                           "measured_flops": float(count_flops(small, example_inputs)) / cost.base_flops,
                           "measured_params": float(count_params(small)) / cost.base_params,
                           "selected_flops": float(cost.flops(selected)) / cost.base_flops}
    if end_mask is not None:
        out["expected_end"] = float(term.fraction(end_mask.detach()))
        out["expected_end_flops"] = term.flops(end_mask)
    return out


def anneal(start: float, end: float, progress: float) -> float:
    """``start / (1 + (start / end - 1) * progress)``: from ``start`` at progress 0 to ``end``
    at 1, falling fast at first (the schedule ``1 / (1 + 49 e / E)`` for 1 -> 0.02)."""
    progress = min(max(progress, 0.0), 1.0)
    return start / (1.0 + (start / end - 1.0) * progress)


def bn_relu_modules(graph: Any) -> set[str]:
    """BatchNorm modules of the eval trace (op ``batch_norm``) whose every output is
    consumed by ReLU ops only: where ``P(ReLU zeroes channel c) = Phi(-beta_c / |gamma_c|)``."""
    return relu_fed_modules(graph, {"batch_norm"})


def relu_fed_modules(graph: Any, kinds: set[str] | None = None) -> set[str]:
    """Modules of the eval trace whose every output is consumed by ReLU ops only (and, with
    ``kinds``, whose ops are all of those kinds): where a non-negative channel scale commutes
    with the activation that follows."""
    ops = graph.ops("eval")
    consumers: dict[int, list[str]] = {}
    for op in ops:
        for v in op.in_values:
            consumers.setdefault(v, []).append(op.name)
    outs: dict[str, list[int]] = {}
    op_kinds: dict[str, set[str]] = {}
    for op in ops:
        outs.setdefault(op.module, []).extend(op.out_values)
        op_kinds.setdefault(op.module, set()).add(op.name)
    return {name for name, values in outs.items()
            if (kinds is None or op_kinds[name] <= kinds) and values
            and all(consumers.get(v) and all(c in ("relu", "relu_") for c in consumers[v]) for v in values)}


def budget_penalty(fraction: Tensor, target: float) -> Tensor:
    """``|log(fraction / target)|``: zero on the budget, pushing the expected cost towards it
    from either side with a pull that does not depend on the model's size."""
    return torch.log(fraction.clamp_min(1e-12) / target).abs()


def inverse_positions(index: Tensor, size: int) -> np.ndarray | None:
    """``pos[c]``: the output position that carries gate channel ``c`` of a site whose
    ``index[i]`` is the gate channel of position ``i`` (None if some channel is missing)."""
    idx = index.cpu().numpy()
    pos = np.full(size, -1, dtype=np.int64)
    for i, c in enumerate(idx):
        if c < size and pos[c] < 0:
            pos[c] = i
    return None if (pos < 0).any() else pos


def own_param_group(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], lr: float, **options: Any) -> None:
    """Move ``params`` out of ``optimizer``'s param groups into one group of their own at
    learning rate ``lr`` (the LR schedule scales it like the others) with the other group
    ``options`` given (e.g. ``weight_decay=0.0``; the rest are the optimizer's defaults). Call it from
    :meth:`Callback.on_train_start`, which runs before the scheduler is built and before a
    checkpoint's optimizer state is loaded, so a resumed run has the same groups."""
    moved = {id(p) for p in params}
    taken = []
    for group in optimizer.param_groups:
        taken += [p for p in group["params"] if id(p) in moved]
        group["params"] = [p for p in group["params"] if id(p) not in moved]
    if taken:
        optimizer.add_param_group({"params": taken, "lr": lr, "initial_lr": lr, **options})


def reinitialise(model: nn.Module, who: str = "reinitialise") -> None:
    """Re-initialise every parameter and buffer of ``model`` in place: ``reset_parameters()``
    on every module that has it, ``reset_running_stats()`` on every norm that keeps statistics
    (what a network retrained "from scratch" starts from; seed torch first for a reproducible
    draw). Raises :class:`PruningError`, prefixed with ``who`` and before changing anything,
    naming the tensors no module can reset (their module has neither method): such a network
    must not keep trained values."""
    kept = []
    for name, mod in model.named_modules():
        if not callable(getattr(mod, "reset_parameters", None)) and not callable(getattr(mod, "reset_running_stats", None)):
            kept += [f"{name}.{t}" if name else t for t, v in (*mod._parameters.items(), *mod._buffers.items())
                     if v is not None]
    if kept:
        raise PruningError(f"{who}: cannot re-initialise {', '.join(kept)} (their module has no "
                           "reset_parameters()); retrain without re-initialising or give those modules one")
    for mod in model.modules():
        if callable(getattr(mod, "reset_parameters", None)):
            mod.reset_parameters()
        if callable(getattr(mod, "reset_running_stats", None)):
            mod.reset_running_stats()
