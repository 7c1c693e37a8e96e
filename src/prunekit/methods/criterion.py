"""Plain criterion pruning as a method: score, remove, no recovery (the baseline every
other method is compared with). One registered method per criterion, named ``criterion:NAME``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

import prunekit as pk
from prunekit import criteria
from prunekit.methods import MethodResult, budget_config, register, take_batches


def prune_by_criterion(model: nn.Module, example_inputs: Any, *, criterion: str = "l2",
                       loader: Iterable[Any] | None = None, batches: int = 8, **kwargs: Any) -> MethodResult:
    """Remove the lowest-scored channels by ``criterion`` under the budget in ``kwargs``
    (see :func:`prunekit.methods.budget_config`); data-driven criteria use ``batches``
    batches of ``loader``. Returns the pruned model and plan."""
    cfg = budget_config(kwargs, f"criterion:{criterion}")
    ctx: dict[str, Any] = {}
    if criterion in criteria.DATA_CRITERIA:
        ctx = {"loader": take_batches(loader, batches, criterion), "batches": batches}
    small, plan = pk.prune(model, example_inputs, config=cfg, criterion=criterion, criterion_kwargs=ctx,
                           return_plan=True)
    return MethodResult(small, plan, {"criterion": criterion})


def _make(name: str) -> Any:
    def method(model: nn.Module, example_inputs: Any, **kwargs: Any) -> MethodResult:
        return prune_by_criterion(model, example_inputs, criterion=name, **kwargs)
    method.__doc__ = f"Prune by the '{name}' criterion, no recovery; returns a MethodResult."
    return method


for _name in criteria.list_criteria():
    register(f"criterion:{_name}")(_make(_name))
