"""Small helpers that make the engine's own bookkeeping cheaper."""

from __future__ import annotations

import contextvars
import functools
import gc
from typing import Any, Callable, TypeVar

from torch import Tensor, nn

F = TypeVar("F", bound=Callable[..., Any])

# Module walks of the models seen during the current top-level call (see ``engine_call``).
_WALKS: contextvars.ContextVar[dict[int, tuple[nn.Module, list[tuple[str, nn.Module]]]] | None] = \
    contextvars.ContextVar("prunekit_walks", default=None)


def engine_call(fn: F) -> F:
    """Mark a top-level engine entry point (``trace``, ``prune``...).

    During the call Python's cyclic garbage collector is paused (tracing and surgery make
    many small objects, and a full collection walks every object in the process, costing
    more than the work; reference counting still frees everything outside cycles), and
    :func:`walk` remembers each model's module list, which no engine step changes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _WALKS.get() is not None:  # nested entry: the outer call set everything up
            return fn(*args, **kwargs)
        token = _WALKS.set({})
        collecting = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if collecting:
                gc.enable()
            _WALKS.reset(token)

    return wrapper  # type: ignore[return-value]


def walk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules(remove_duplicate=False))``, computed once per model and
    top-level engine call (a module reachable by two paths appears under both names)."""
    cache = _WALKS.get()
    if cache is None:
        return list(model.named_modules(remove_duplicate=False))
    hit = cache.get(id(model))
    if hit is None or hit[0] is not model:
        hit = cache[id(model)] = (model, list(model.named_modules(remove_duplicate=False)))
    return hit[1]


def named_tensors(model: nn.Module, stores: tuple[str, ...] = ("_parameters", "_buffers")
                  ) -> list[tuple[str, dict[str, Any], str, Tensor]]:
    """``(qualified name, store, key, tensor)`` for every non-None entry of each module's
    ``stores`` (``_parameters`` and/or ``_buffers``) in :func:`walk` order, aliases included."""
    return [(f"{prefix}.{key}" if prefix else key, store, key, t)
            for prefix, mod in walk(model) for kind in stores
            for store in (getattr(mod, kind),) for key, t in store.items() if t is not None]


def unique_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` once, in ``model.modules()`` order (from :func:`walk`)."""
    seen: set[int] = set()
    out = []
    for _, m in walk(model):
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out
