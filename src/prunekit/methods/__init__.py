"""Published pruning methods, one readable module each, composed from the engine's parts.

Every method has the same call shape and is found by name, like criteria::

    result = prunekit.methods.get("channel_pruning")(model, x, loader=calib, target_flops=0.5)
    result.model, result.plan, result.info

Budgets are the options of :func:`prunekit.prune` (``ratio`` or ``target_flops`` / ``target_params`` /
``target_latency``, ``ignore``, ``round_to``, ...) as keywords and/or a ``config=``
:class:`prunekit.PruneConfig` (keywords win), except the criterion, which the method
chooses; ``loader`` yields calibration ``(inputs, targets)`` batches and ``batches`` says how
many to use. Register your own with :func:`register`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from prunekit.config import FIELDS, PruneConfig, make_config
from prunekit.errors import PruningError
from prunekit.features import Batch, as_batch
from prunekit.plan import PruningPlan
from prunekit.registry import Registry


@dataclass
class MethodResult:
    """What a method returns: the pruned model, its plan (relative to the original
    architecture, so :func:`prunekit.save` works) and method-specific facts."""

    model: nn.Module
    plan: PruningPlan
    info: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    """A pruning method: ``(model, example_inputs, *, loader, ...) -> MethodResult``."""

    def __call__(self, model: nn.Module, example_inputs: Any, **kwargs: Any) -> MethodResult: ...


_METHODS: Registry[Method] = Registry("method")
# A method scores channels its own way; these options of a PruneConfig are not its to take.
_METHOD_OWNED = ("criterion", "criterion_kwargs")


def register(name: str) -> Callable[[Method], Method]:
    """Decorator registering a method under ``name`` (overwriting is an error)."""
    return _METHODS.register(name)


def _load_all() -> None:
    from prunekit.methods import (autopruner, block_drop, cacp, cap, channel_pruning, colombo_gao,  # noqa: F401
                                  criterion, dais, functionality, iterative, ofa, pai, partition, resconv, scp,
                                  slimming, svd, trp, ucp)


def get(name: str) -> Method:
    """The method registered as ``name``; unknown names raise KeyError listing all."""
    _load_all()
    return _METHODS.get(name)


def list_methods(pattern: str = "*") -> list[str]:
    """Names of registered methods matching a glob pattern."""
    _load_all()
    return _METHODS.names(pattern)


def take_batches(loader: Iterable[Any] | None, batches: int, method: str) -> list[Batch]:
    """The first ``batches`` calibration batches of ``loader`` as a re-iterable list of
    ``(inputs, targets or None)``; a missing or empty loader raises :class:`PruningError`."""
    if loader is None:
        raise PruningError(f"method '{method}' needs calibration data: pass loader=... (batches of (inputs, targets))")
    out = [as_batch(item) for item in itertools.islice(loader, batches)]
    if not out:
        raise PruningError(f"method '{method}': the calibration loader yielded no batches")
    return out


def budget_config(kwargs: Mapping[str, Any], method: str) -> PruneConfig:
    """The pruning options among a method's extra keywords: ``config`` (a
    :class:`PruneConfig`, optional) with the other keywords over it; a keyword given as None
    counts as not given. Raises :class:`PruningError` naming keywords that are neither
    budget options nor the method's own, and ``criterion``/``criterion_kwargs`` (the method
    chooses how channels are scored)."""
    options = {k: v for k, v in kwargs.items() if v is not None}
    config = options.pop("config", None)
    bad = [k for k in options if k in _METHOD_OWNED or k not in FIELDS]
    if bad:
        valid = ", ".join(k for k in FIELDS if k not in _METHOD_OWNED)
        raise PruningError(f"method '{method}': unknown option{'s' if len(bad) > 1 else ''} "
                           f"{', '.join(repr(k) for k in bad)}; budget options: {valid}, config")
    return make_config(config, **options)
