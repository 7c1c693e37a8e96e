"""The ``se`` gate kind: squeeze-excitation attention as a channel gate (the blocks of UCP,
:mod:`prunekit.methods.ucp`).

At each of its sites (one block per site: with ``attach_gates(..., at="producers")`` every
producing layer of the group, conv -> SE -> BN as the SE papers place them) the gate computes
one scale per channel and *sample*: squeeze by the mean over the non-channel positions of the
sample, then FC -> ReLU -> FC -> sigmoid (:class:`Excitation`), and multiplies the site's
output by it. The gate records, while ``recording`` is set, the sum and count of the scales
per site, so that :meth:`SeGate.expected_values` is the per-channel mean excitation over the
data seen (averaged over the sites), :meth:`SeGate.site_expected_values` one site's mean (what
``GateSet.fold(approximate=True)`` folds there) and :meth:`SeGate.importance` the mean
excitation summed over the sites: UCP's channel score. While the gate is in training mode the
scales of the current pass are kept in :attr:`SeGate.recent` (for an optional penalty on
them; whoever reads them clears the list before each pass).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.gates import Gate, register_gate

__all__ = ["Excitation", "SeGate"]


class Excitation(nn.Module):
    """One SE block (the UCP authors' ``SELayer``): squeeze (mean over positions) -> FC (no
    bias) -> ReLU -> FC (no bias) -> sigmoid, one scale per channel and sample; hidden width
    ``channels // reduction``, or 1 with biased FCs when ``channels <= reduction``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        small = channels <= reduction
        hidden = 1 if small else channels // reduction
        self.fc1 = nn.Linear(channels, hidden, bias=small)
        self.fc2 = nn.Linear(hidden, channels, bias=small)

    def forward(self, x: Tensor, channel_dim: int) -> Tensor:
        """Scales of shape ``(batch, channels)`` for activation ``x``."""
        squeezed = x.movedim(channel_dim, -1).reshape(x.shape[0], -1, x.shape[channel_dim]).mean(1)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))


@register_gate("se")
class SeGate(Gate):
    """Squeeze-excitation scales, one :class:`Excitation` block (``reduction``) per site."""

    foldable = False
    input_dependent = True

    def __init__(self, size: int, *, reduction: int = 16) -> None:
        super().__init__(size)
        if reduction < 1:
            raise ValueError(f"se gate: reduction={reduction} must be >= 1")
        self.reduction = int(reduction)
        self.register_buffer("excitation_sum", torch.zeros(0, size, dtype=torch.float64))
        self.register_buffer("excitation_count", torch.zeros(0, dtype=torch.float64))
        self.on_attach(1)  # one site until attach_gates says how many
        self.recording = False
        self.identity = False
        self.recent: list[Tensor] = []

    def on_attach(self, sites: int) -> None:
        """One SE block and one record per site."""
        self.blocks = nn.ModuleList(Excitation(self.size, self.reduction) for _ in range(sites))
        self.excitation_sum = torch.zeros(sites, self.size, dtype=torch.float64)
        self.excitation_count = torch.zeros(sites, dtype=torch.float64)

    def multiplier(self, x: Tensor, dim: int, site: int = 0) -> Tensor:
        """Site ``site``'s block's scales for ``x``, shape ``(batch, size)`` (recorded while
        ``recording``; kept in :attr:`recent` in training mode); ones after
        :meth:`set_identity`."""
        if self.identity:
            return x.new_ones(self.size)
        scale = self.blocks[site](x, dim)
        if self.recording:
            with torch.no_grad():
                self.excitation_sum[site] += scale.detach().double().sum(0)
                self.excitation_count[site] += scale.shape[0]
        if self.training:
            self.recent.append(scale)
        return scale

    def reset_statistics(self) -> None:
        """Forget the recorded excitations."""
        self.excitation_sum.zero_()
        self.excitation_count.zero_()

    def site_expected_values(self, site: int) -> Tensor:
        """Site ``site``'s mean excitation per channel over the recorded samples (1 after
        :meth:`set_identity`; 0 before anything was recorded)."""
        if self.identity:
            return torch.ones(self.size, device=self.excitation_sum.device)
        return (self.excitation_sum[site] / self.excitation_count[site].clamp_min(1)).float()

    def expected_values(self) -> Tensor:
        """The mean excitation per channel, averaged over the sites."""
        return torch.stack([self.site_expected_values(k) for k in range(len(self.blocks))]).mean(0)

    def values(self) -> Tensor:
        """The mean excitation (:meth:`expected_values`): the scales themselves depend on the input."""
        return self.expected_values()

    def importance(self) -> np.ndarray:
        """The mean excitation summed over the sites (UCP's score of a coupled group)."""
        means = [self.site_expected_values(k).double() for k in range(len(self.blocks))]
        return torch.stack(means).sum(0).cpu().numpy()

    def set_identity(self) -> None:
        """Multiply by exactly 1 from now on (after the means were folded into the layers)."""
        self.identity = True
