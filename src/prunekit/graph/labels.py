"""Channel labels: which coupled-channel *atom* each element of a traced tensor belongs to.

Every traced tensor carries an int64 label tensor broadcastable to its real shape, kept
*compact*: a dim along which all labels are equal is stored with size 1 (so a conv output
``(N, C, H, W)`` carries ``(1, C, 1, 1)``). Label 0 means "no prunable channel here".
Pure index rearrangements (view, permute, cat, split, getitem, ...) are propagated by
running the very same op on the label tensor, which makes channel shuffle, unequal
splits, attention-head reshapes and flatten->linear exact without special cases.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def compact(lab: Tensor) -> Tensor:
    """Return ``lab`` with every dim along which it is constant narrowed to size 1."""
    a = lab.numpy()  # numpy: these are small arrays, where torch's per-op overhead dominates
    if a.ndim == 0 or a.size == 0:  # 0-d and empty labels are already compact (min() of nothing fails)
        return lab if lab.is_contiguous() else lab.contiguous()
    varying = [d for d, n in enumerate(a.shape) if n > 1]
    if len(varying) == 1:  # the common case, e.g. (1, C, 1, 1)
        if a.min() != a.max():
            return lab if lab.is_contiguous() else lab.contiguous()
        return torch.from_numpy(a.reshape(-1)[:1].reshape((1,) * a.ndim).copy())
    for d in varying:
        first = a[(slice(None),) * d + (slice(0, 1),)]
        if (a == first).all():
            a = first
    return torch.from_numpy(np.ascontiguousarray(a))


def zeros_like_shape(shape: tuple[int, ...]) -> Tensor:
    """Return the compact label of an untracked tensor of ``shape`` (all zeros).

    One shared tensor per rank: labels are never written in place (rules build new ones)."""
    n = len(shape)
    if n >= len(_ZEROS):
        return torch.zeros((1,) * n, dtype=torch.long)
    return _ZEROS[n]


_ZEROS = [torch.zeros((1,) * n, dtype=torch.long) for n in range(9)]


def align(lab: Tensor, ndim: int) -> Tensor:
    """Left-pad ``lab`` with size-1 dims to ``ndim`` dims (numpy broadcasting rules)."""
    if lab.ndim > ndim:
        raise ValueError("label has more dims than the target")
    return lab.reshape((1,) * (ndim - lab.ndim) + tuple(lab.shape))
