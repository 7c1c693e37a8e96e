"""Low-rank decomposition of conv and linear layers into factorised pairs, saved as plan steps.

A conv ``k x k`` (``C -> N``) becomes two layers through a rank-``r`` bottleneck:

* ``mode="channel"`` (TRP's NC scheme): a ``k x k`` conv ``C -> r`` then a 1x1 conv ``r -> N``,
  from the SVD of the weight as an ``N x (C k k)`` matrix; a linear layer becomes two linears;
* ``mode="spatial"`` (TRP's VH scheme, AIMET's spatial SVD, Tai et al. 2016): a ``k x 1`` conv
  ``C -> r`` then a ``1 x k`` conv ``r -> N``, from the SVD of the ``(C k) x (N k)`` matrix
  ``M[(c, i), (n, j)] = W[n, c, i, j]``; layers without a 2-D kernel of both sides > 1 (1x1
  convs, linears) are left alone.

The rank of each layer is chosen by exactly one rule:

* ``energy=e`` — the smallest rank keeping a fraction ``e`` of the squared singular values;
* ``threshold=t`` — the number of singular values ``>= t`` (TRP's value threshold);
* ``ranks=`` — explicit: one rank for every layer, or a dict name -> rank (others left alone);
* ``target_flops=f`` / ``target_params=f`` — the model keeps a fraction ``f`` of its FLOPs /
  parameters; ranks are allocated across layers by ``allocation``: ``"weights"`` (greedy
  knapsack on the discarded singular-value energy, no data), ``"table"`` (the same greedy on a
  measured sensitivity table) or ``"aimet"`` (AIMET's greedy selection from the table), see
  :mod:`prunekit.decompose.allocate` and :mod:`prunekit.decompose.sensitivity`.

Ranks are rounded up to multiples of ``round_to``. A layer whose factorised pair would not cost
fewer FLOPs (parameters, under ``target_params``) than the layer itself is left alone (unless
``skip_unprofitable=False`` with a rule other than a target). With ``refit_loader`` the second
factor of every factorised layer is refitted by least squares to the original layer's outputs
(:mod:`prunekit.decompose.refit`).

The result is a new model (the input model is never changed) and a
:class:`~prunekit.plan.PruningPlan` of :class:`~prunekit.plan.Replace` steps, so
``prunekit.save(model, plan, dir)`` / ``prunekit.load(dir, builder)`` rebuild it without
pickle; it exports to ONNX like any model of convs and linears. The plan's
``meta["decompose"]`` records the rule, the chosen and full ranks, the layers left alone and
why, and the FLOPs/parameters before and after (measured). For a model that was pruned before,
compose the plans: ``prunekit.plan.compose(prune_plan, decompose_plan)``.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
>>> small, plan = decompose(net, torch.randn(1, 3, 16, 16), mode="channel", ranks={"2": 4})
>>> small[2]
Sequential(
  (0): Conv2d(32, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (1): Conv2d(4, 32, kernel_size=(1, 1), stride=(1, 1))
)
>>> plan.meta["decompose"]["ranks"], type(net[2]).__name__
({'2': 4}, 'Conv2d')
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.decompose.allocate import aimet_ranks, greedy_ranks
from prunekit.decompose.layers import (
    KINDS,
    RankLayer,
    energy_rank,
    factorisable,
    find_layers,
    round_rank,
    threshold_rank,
)
from prunekit.decompose.refit import refit_second_factors
from prunekit.decompose.sensitivity import DEFAULT_CANDIDATES, SensitivityTable, compute_sensitivity
from prunekit.errors import PruningError
from prunekit.features import as_batch
from prunekit.graph import module_names
from prunekit.measure import count_flops, count_params
from prunekit.plan import PruningPlan
from prunekit.surgery import apply_plan
from prunekit.surgery.replace import check_structure, replace_step

__all__ = ["ALLOCATIONS", "DecomposeConfig", "SensitivityTable", "compute_sensitivity", "decompose",
           "energy_rank", "factorisable", "threshold_rank"]

ALLOCATIONS = ("weights", "table", "aimet")
_RULES = ("energy", "threshold", "ranks", "target_flops", "target_params")


@dataclasses.dataclass(frozen=True)
class DecomposeConfig:
    """The options of :func:`decompose` (see its module docstring for what each rule does).

    ``mode``: ``"channel"`` or ``"spatial"``. Exactly one rule: ``energy`` (in (0, 1]),
    ``threshold`` (>= 0), ``ranks`` (an int for every layer, or a dict name -> rank),
    ``target_flops`` / ``target_params`` (fraction kept, in (0, 1]). ``round_to``: ranks are
    multiples of it. ``ignore``: modules (names or objects) left alone, with what lies inside
    them. ``allocation`` (targets only): ``"weights"``, ``"table"`` or ``"aimet"``;
    ``sensitivity``: a :class:`SensitivityTable` or the path of its JSON file (computed and
    written there when missing) for the table allocations; ``candidates``: fractions of the
    full rank measured when a table is computed. ``batches``: calibration batches used for
    the table and the refit. ``skip_unprofitable``: leave alone layers whose factorisation
    would not reduce FLOPs (always so under a target). Checked on construction
    (:class:`PruningError` naming the option)."""

    mode: str = "channel"
    energy: float | None = None
    threshold: float | None = None
    ranks: int | Mapping[str, int] | None = None
    target_flops: float | None = None
    target_params: float | None = None
    round_to: int = 1
    ignore: tuple[nn.Module | str, ...] = ()
    allocation: str = "weights"
    sensitivity: SensitivityTable | str | os.PathLike[str] | None = None
    candidates: tuple[float, ...] = DEFAULT_CANDIDATES
    batches: int = 8
    skip_unprofitable: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.mode not in KINDS:
            raise PruningError(f"mode={self.mode!r}: 'channel' or 'spatial'")
        given = [k for k in _RULES if getattr(self, k) is not None]
        if len(given) != 1:
            raise PruningError(f"decompose: give exactly one of {', '.join(_RULES)} "
                               f"({'none' if not given else ', '.join(given)} given)")
        if self.energy is not None and not 0.0 < float(self.energy) <= 1.0:
            raise PruningError(f"energy={self.energy!r}: the fraction of squared singular values kept, in (0, 1]")
        if self.threshold is not None and not float(self.threshold) >= 0.0:
            raise PruningError(f"threshold={self.threshold!r}: a singular value, >= 0")
        for key in ("target_flops", "target_params"):
            v = getattr(self, key)
            if v is not None and not 0.0 < float(v) <= 1.0:
                raise PruningError(f"{key}={v!r}: the fraction kept, in (0, 1]")
        if self.ranks is not None:
            values = self.ranks.values() if isinstance(self.ranks, Mapping) else [self.ranks]
            if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 1 for r in values):
                raise PruningError(f"ranks={self.ranks!r}: a rank >= 1, or a dict of module name -> rank >= 1")
            if isinstance(self.ranks, Mapping):
                put("ranks", {str(k): int(v) for k, v in self.ranks.items()})
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, numbers.Integral) or self.round_to < 1:
            raise PruningError(f"round_to={self.round_to!r}: an integer >= 1")
        if isinstance(self.ignore, (str, nn.Module)):
            put("ignore", (self.ignore,))
        put("ignore", tuple(self.ignore or ()))
        if self.allocation not in ALLOCATIONS:
            raise PruningError(f"allocation={self.allocation!r}: one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "weights" and self.target is None:
            raise PruningError(f"allocation={self.allocation!r}: only with target_flops or target_params")
        put("candidates", tuple(float(f) for f in self.candidates))
        if not self.candidates or not all(0.0 < f < 1.0 for f in self.candidates):
            raise PruningError(f"candidates={self.candidates!r}: fractions of the full rank in (0, 1)")
        if isinstance(self.batches, bool) or not isinstance(self.batches, numbers.Integral) or self.batches < 1:
            raise PruningError(f"batches={self.batches!r}: an integer >= 1")

    @property
    def target(self) -> tuple[str, float] | None:
        """``("flops" | "params", fraction kept)``, or None when the rule is not a target."""
        if self.target_flops is not None:
            return "flops", float(self.target_flops)
        if self.target_params is not None:
            return "params", float(self.target_params)
        return None

    @property
    def rule(self) -> str:
        """The name of the rule given (``"energy"``, ``"threshold"``, ``"ranks"``, ``"target_flops"``...)."""
        return next(k for k in _RULES if getattr(self, k) is not None)

    def replace(self, **changes: Any) -> DecomposeConfig:
        """A copy with ``changes`` applied and checked again; a rule given in ``changes``
        replaces the config's rule."""
        if any(k in _RULES for k in changes):
            changes = {**{k: None for k in _RULES}, **changes}
        return dataclasses.replace(self, **changes)


def _make_config(config: DecomposeConfig | None, options: dict[str, Any]) -> DecomposeConfig:
    fields = {f.name for f in dataclasses.fields(DecomposeConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise PruningError(f"decompose: unknown option{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))}; valid: {', '.join(sorted(fields))}, config")
    if config is None:
        return DecomposeConfig(**options)
    if not isinstance(config, DecomposeConfig):
        raise PruningError(f"config: expected a DecomposeConfig, got {type(config).__name__}")
    return config.replace(**options) if options else config


def _rule_ranks(cfg: DecomposeConfig, layers: list[RankLayer], left: dict[str, str]) -> dict[str, int]:
    """Ranks by the energy / threshold / explicit rule (before rounding and the profit check)."""
    if cfg.energy is not None:
        return {l.name: energy_rank(l.sigma, float(cfg.energy)) for l in layers}
    if cfg.threshold is not None:
        return {l.name: threshold_rank(l.sigma, float(cfg.threshold)) for l in layers}
    if isinstance(cfg.ranks, Mapping):
        known = {l.name for l in layers}
        bad = [n for n in cfg.ranks if n not in known]
        if bad:
            why = "; ".join(f"'{n}': {left[n]}" if n in left else f"'{n}': not a layer {cfg.mode}-factorisable"
                            for n in bad)
            raise PruningError(f"ranks: {why}; factorisable layers: {', '.join(sorted(known)) or 'none'}")
        for l in layers:
            if l.name not in cfg.ranks:
                left[l.name] = "no rank given"
        return {n: min(r, next(l.full_rank for l in layers if l.name == n)) for n, r in cfg.ranks.items()}
    assert isinstance(cfg.ranks, int)
    return {l.name: min(cfg.ranks, l.full_rank) for l in layers}


def _table(cfg: DecomposeConfig, model: nn.Module, x: Any, layers: list[RankLayer], ignore: tuple[str, ...],
           calib_loader: Iterable[Any] | None, evaluate: Callable[[nn.Module], float] | None
           ) -> tuple[SensitivityTable, str | None]:
    """The sensitivity table the config names (loaded, or computed and saved), checked
    against ``layers``; and where it lives (None: only in memory)."""
    source = cfg.sensitivity
    path = None
    if isinstance(source, SensitivityTable):
        table = source
    else:
        if source is not None and Path(source).exists():
            table = SensitivityTable.load(source)
        else:
            if calib_loader is None and evaluate is None:
                raise PruningError(f"allocation={cfg.allocation!r} needs a sensitivity table: pass sensitivity= "
                                   "(a table or the path of its JSON file) or calib_loader= to compute one")
            table = compute_sensitivity(model, x, calib_loader or (), mode=cfg.mode, candidates=cfg.candidates,
                                        batches=cfg.batches, evaluate=evaluate, ignore=ignore,
                                        round_to=cfg.round_to)
            if source is not None:
                table.save(source)
        path = None if source is None else str(source)
    table.check(layers, cfg.mode)
    return table, path


def decompose(model: nn.Module, example_inputs: Any, config: DecomposeConfig | None = None, *,
              refit_loader: Iterable[Any] | None = None, calib_loader: Iterable[Any] | None = None,
              evaluate: Callable[[nn.Module], float] | None = None, **options: Any) -> tuple[nn.Module, PruningPlan]:
    """Factorise ``model``'s conv/linear layers into low-rank pairs (module docstring).

    ``config`` (a :class:`DecomposeConfig`) and/or its fields as keywords (keywords win) give
    the mode, the rank rule and its options. ``calib_loader`` (batches of ``(inputs,
    targets)``) computes a sensitivity table for ``allocation="table" | "aimet"`` when none is
    given; ``evaluate(model) -> score`` (higher is better) measures it instead of the output
    error. ``refit_loader`` refits every second factor by least squares on its first
    ``config.batches`` batches. Returns ``(new model, plan)``; the plan applied to ``model``
    (``prunekit.apply_plan``) gives the same architecture, and the input model is unchanged.
    Raises :class:`PruningError` for bad options, unknown layers in ``ranks`` and budgets no
    allocation reaches."""
    cfg = _make_config(config, options)
    ignore = module_names(model, cfg.ignore, "ignore")
    reference = copy.deepcopy(model)  # hooks, SVDs and table swaps happen here, never on the caller's model
    layers, left = find_layers(reference, example_inputs, cfg.mode, ignore)
    target = cfg.target
    table_path = None
    if target is not None:
        what, fraction = target
        total = count_flops(reference, example_inputs) if what == "flops" else count_params(reference)
        if cfg.allocation == "aimet":
            table, table_path = _table(cfg, reference, example_inputs, layers, ignore, calib_loader, evaluate)
            cands = {l.name: list(zip(table.layers[l.name].ranks, table.layers[l.name].errors)) for l in layers}
            ranks = aimet_ranks(layers, what, total, fraction * total, cands)
        else:
            if cfg.allocation == "table":
                table, table_path = _table(cfg, reference, example_inputs, layers, ignore, calib_loader, evaluate)
                error = lambda layer, r: table.error(layer.name, r)  # noqa: E731
            else:
                error = lambda layer, r: layer.tail_energy(r)  # noqa: E731
            ranks = greedy_ranks(layers, what, total, fraction * total, error, cfg.round_to)
        for l in layers:
            if l.name not in ranks:
                left.setdefault(l.name, "kept whole by the allocation")
    else:
        what = "flops"
        ranks = {}
        for name, r in _rule_ranks(cfg, layers, left).items():
            layer = next(l for l in layers if l.name == name)
            r = round_rank(r, cfg.round_to, layer.full_rank)
            if cfg.skip_unprofitable and not layer.profitable(r, what):
                left[name] = (f"rank {r} of {layer.full_rank} would not reduce FLOPs "
                              f"({layer.cost(what, r)} >= {layer.cost(what, None)})")
                continue
            ranks[name] = r
    by_name = {l.name: l for l in layers}
    order = [l.name for l in layers if l.name in ranks]
    steps = tuple(replace_step(name, by_name[name].factorise(ranks[name])) for name in order)
    plan = PruningPlan(steps)
    result = apply_plan(reference, plan)
    refitted: list[str] = []
    if refit_loader is not None and order:
        batches = [as_batch(b) for b in itertools.islice(refit_loader, cfg.batches)]
        if not batches:
            raise PruningError("refit_loader: yielded no batches")
        refitted = refit_second_factors(result, reference, order, batches)
        # The plan's in-memory tensors follow the refitted weights (saved runs take the weights file).
        plan = PruningPlan(tuple(replace_step(name, result.get_submodule(name)) for name in order))
    problem = check_structure(reference, result, example_inputs, plan)
    if problem is not None:
        raise PruningError(f"decompose: the factorised model fails a structural check: {problem}")
    flops = (count_flops(reference, example_inputs), count_flops(result, example_inputs))
    params = (count_params(reference), count_params(result))
    meta: dict[str, Any] = {
        "mode": cfg.mode, "rule": cfg.rule, "round_to": cfg.round_to,
        "ranks": {n: ranks[n] for n in order}, "full_ranks": {l.name: l.full_rank for l in layers},
        "left_alone": dict(sorted(left.items())), "refitted": refitted,
        "flops": {"before": flops[0], "after": flops[1], "fraction": flops[1] / flops[0] if flops[0] else 1.0},
        "params": {"before": params[0], "after": params[1], "fraction": params[1] / params[0] if params[0] else 1.0},
    }
    if target is not None:
        got = meta[target[0]]["fraction"]
        meta.update(target={"kind": target[0], "fraction": target[1], "achieved": got,
                            "relative_error": abs(got - target[1]) / target[1]},
                    allocation=cfg.allocation, sensitivity=table_path)
    elif cfg.energy is not None or cfg.threshold is not None:
        meta[cfg.rule] = float(cfg.energy if cfg.energy is not None else cfg.threshold)  # type: ignore[arg-type]
    return result, plan.with_meta(decompose=meta, ranks_removed=sum(by_name[n].full_rank - ranks[n] for n in order))
