"""Small helpers that make the engine's own bookkeeping cheaper."""

from __future__ import annotations

import functools
import gc
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def gc_paused(fn: F) -> F:
    """Run ``fn`` with Python's cyclic garbage collector paused (restored afterwards).

    Tracing and surgery allocate many small objects; a full collection walks every object
    in the process (models, tensors' Python wrappers) and can cost more than the work
    itself. Reference counting still frees everything that is not in a cycle, and the
    collector resumes when the call returns."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper  # type: ignore[return-value]
