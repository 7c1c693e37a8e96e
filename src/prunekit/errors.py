"""Exceptions raised by prunekit. Every message names the module, op or option at fault."""

from __future__ import annotations


class PruningError(ValueError):
    """Raised when a model cannot be pruned as asked; the user's model is left untouched."""


class PruningShortfallWarning(UserWarning):
    """Warned when a prune removes nothing, or far less than asked (a ratio's channels not
    removed, a budget not reached); ``plan.meta["shortfall"]`` says the same and why."""
