"""The ``mask`` gate kind: a fixed 0/1 (or any fixed) multiplier per channel, set from outside.

Methods that train several sub-networks sharing one set of weights (once-for-all and
slimmable training, :mod:`prunekit.methods.ofa`) need a gate that *is* a chosen structure:
a hard keep mask that the method replaces before every forward pass, which the optimizer
never touches. The ``scale`` kind is not that: its multipliers are parameters, so the training
loop would learn them (and weight decay would shrink them). Here the mask is a buffer without
gradient, not persistent (the model's ``state_dict`` stays the plain model's, the method keeps
the masks in its own checkpointed state), starting at all ones: the original function exactly.

A zero entry on a gate placed after the group's normalisation layers makes the channel's
output exactly zero, so the gated network computes what the network with those channels
removed computes (for layers that map a zero input channel to nothing, as convolutions,
linears and ReLU-like activations do); :func:`prunekit.gates.prune_with_gates` with
``fold=False`` or a plan built from the zero entries gives that network physically.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from prunekit.gates import Gate, register_gate

__all__ = ["MaskGate"]


@register_gate("mask")
class MaskGate(Gate):
    """A fixed multiplier per channel (a non-persistent buffer, no parameter), all ones at
    first; :meth:`set_mask` replaces it."""

    mask: Tensor

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.register_buffer("mask", torch.ones(size), persistent=False)

    def values(self) -> Tensor:
        """The mask itself (no gradient flows into it)."""
        return self.mask

    @torch.no_grad()
    def set_mask(self, values: Tensor | Sequence[float] | np.ndarray) -> None:
        """Replace the mask by ``values`` (``size`` entries, e.g. 0/1 keep flags). Raises
        ValueError for another length. The buffer is written in place: autograd never saves
        it (it needs no gradient; the hook saves the product it builds from it), so a forward
        pass already taken is unaffected when the mask changes before its backward pass."""
        v = torch.as_tensor(np.asarray(values, dtype=np.float32) if not isinstance(values, Tensor) else values)
        if v.shape != (self.size,):
            raise ValueError(f"mask gate: got {tuple(v.shape)} values for {self.size} channels")
        self.mask.copy_(v.to(self.mask))

    def set_identity(self) -> None:
        """All ones again."""
        self.set_mask(torch.ones(self.size))
