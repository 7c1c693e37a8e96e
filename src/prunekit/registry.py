"""A name -> plug-in registry (criteria, methods), in the style of timm's model registry."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Plug-ins of one ``kind`` by name: :meth:`register` as a decorator, :meth:`get`, :meth:`names`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a plug-in under ``name``; returns it unchanged (a taken name is an error)."""

        def deco(fn: T) -> T:
            if name in self.items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self.items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        """The plug-in registered as ``name``; an unknown name raises KeyError listing all."""
        if name not in self.items:
            raise KeyError(f"unknown {self.kind} '{name}'; available: {', '.join(sorted(self.items))}")
        return self.items[name]

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a glob pattern."""
        return sorted(n for n in self.items if fnmatch.fnmatch(n, pattern))
