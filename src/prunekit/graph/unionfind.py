"""A vectorised union-find over integer ids (numpy), used while tracing and grouping."""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Disjoint sets over ``0..n-1``; ``union`` and ``find`` take whole arrays at once."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(max(n, 1), dtype=np.int64)

    def grow(self, n: int) -> None:
        """Make room for ids up to ``n`` (new ids start as singletons)."""
        old = len(self.parent)
        if n >= old:
            size = max(2 * old, n + 1)
            self.parent = np.concatenate([self.parent, np.arange(old, size, dtype=np.int64)])

    def find(self, x: np.ndarray | int) -> np.ndarray:
        """Representative of each id (the smallest id of its set), with path compression."""
        x = np.asarray(x, dtype=np.int64)
        parent = self.parent
        r = parent[x]
        while True:
            rr = parent[r]
            if (rr == r).all():
                break
            r = rr
        parent[x] = r
        return r

    def union(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Join ``a[i]`` with ``b[i]`` for all i; returns which pairs were not yet joined."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        ra, rb = self.find(a), self.find(b)
        new = ra != rb
        while True:
            m = ra != rb
            if not m.any():
                return new
            lo, hi = np.minimum(ra[m], rb[m]), np.maximum(ra[m], rb[m])
            # Each root points at the smallest root it meets; the rest settle next round.
            np.minimum.at(self.parent, hi, lo)
            ra, rb = self.find(a), self.find(b)

    def copy(self) -> "UnionFind":
        """An independent copy."""
        uf = UnionFind(1)
        uf.parent = self.parent.copy()
        return uf

    def roots(self) -> np.ndarray:
        """Representative of every id."""
        return self.find(np.arange(len(self.parent)))
