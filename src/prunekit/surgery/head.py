"""The classifier head of a traced network, and a plan step that gives it another class count.

Transfer to a task with other classes keeps the body and re-creates the last layer.
:func:`find_head` names that layer from the trace (the last layer with filters, a conv or a
linear, to run in the forward pass), whatever the architecture calls it;
:func:`head_step` builds the :class:`~prunekit.plan.Replace` step putting a fresh layer of
the same kind with ``num_classes`` outputs there (the handler's
:meth:`~prunekit.handlers.LayerHandler.resized`), so the change is part of the model's plan
and a saved model reloads with its new head.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prunekit.errors import PruningError
from prunekit.plan import Replace

__all__ = ["find_head", "head_step"]


def find_head(model: nn.Module, graph: Any) -> str:
    """The qualified name of ``model``'s classifier: the module of the last op in ``graph``'s
    eval trace (``graph`` traced from ``model``) whose layer has filters (its handler's
    ``has_filters``: convolutions, linear layers). Raises :class:`PruningError` when no such
    layer runs."""
    from prunekit.handlers import handler_for

    for op in reversed(graph.ops("eval")):
        mod = model.get_submodule(op.module) if op.module else model
        handler = handler_for(mod)
        if handler is not None and handler.has_filters:
            return op.module
    raise PruningError("no classifier head: no convolution or linear layer runs in the traced forward pass")


def head_step(model: nn.Module, name: str, num_classes: int) -> Replace:
    """The plan step replacing layer ``name`` of ``model`` by a fresh, untrained layer of its
    kind and input width with ``num_classes`` outputs (drawn from torch's global generator).
    Raises :class:`PruningError` for ``num_classes < 1``, a module without a handler that can
    rebuild it, or one that cannot have exactly ``num_classes`` outputs (e.g. a grouped conv)."""
    from prunekit.handlers import handler_for
    from prunekit.surgery.replace import replace_step

    if int(num_classes) < 1:
        raise PruningError(f"num_classes={num_classes}: must be >= 1")
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise PruningError(f"head '{name}': the model has no such module") from None
    handler = handler_for(old)
    widths = handler.widths(old) if handler is not None else None
    new = handler.resized(old, 1.0, num_classes / widths[1]) if handler is not None and widths else None
    if new is None:
        raise PruningError(f"head '{name}' ({type(old).__name__}): its handler cannot rebuild it with other outputs")
    got = handler_for(new).widths(new)  # type: ignore[union-attr]
    if got != (widths[0], num_classes):  # type: ignore[index]
        raise PruningError(f"head '{name}' ({type(old).__name__}): cannot have exactly {num_classes} outputs "
                           f"with {widths[0]} inputs (a rebuilt layer has {got})")  # type: ignore[index]
    return replace_step(name, new)
