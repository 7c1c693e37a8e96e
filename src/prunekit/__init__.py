"""prunekit: structured pruning for PyTorch.

Trace a model into coupled channel groups, score and remove whole channels, and get an
ordinary, smaller ``nn.Module`` back. The public API is re-exported lazily here so that
``import prunekit`` stays cheap and sub-packages can be imported on their own.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "trace": "prunekit.api",
    "prune": "prunekit.api",
    "plan_for": "prunekit.api",
    "PruneConfig": "prunekit.config",
    "ModeInputs": "prunekit.runtime",
    "apply_plan": "prunekit.surgery",
    "save": "prunekit.persist",
    "load": "prunekit.persist",
    "profile": "prunekit.measure",
    "DependencyGraph": "prunekit.graph",
    "PruningPlan": "prunekit.plan",
    "PruningError": "prunekit.errors",
    "PruningShortfallWarning": "prunekit.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import public names on first use (PEP 562)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
