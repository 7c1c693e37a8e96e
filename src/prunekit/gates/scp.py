"""The ``scp`` gate kind: a relaxed-Bernoulli channel mask driven by how likely a
BatchNorm -> ReLU pair passes the channel (Kang & Han, ICML 2020).

Under a batch-normalised input, the output of BN channel ``c`` is modelled as
``N(beta_c, gamma_c^2)``, so the ReLU after it zeroes the channel with probability
``P(dead) = Phi(-beta_c / |gamma_c|)`` and passes it with ``P(keep) = Phi(beta_c / |gamma_c|)``.
A gate *bound* to its group's BatchNorm layers (:meth:`ScpGate.bind`) computes these from the
layers' own affine parameters, so the mask has no parameters of its own: learning ``gamma``
and ``beta`` with the weights learns the mask. A group whose gate sits at several such pairs
is dead only where every pair is, ``P(dead) = prod_s Phi(-beta_s / |gamma_s|)`` (the pairs are
taken as independent). An unbound gate (a group without BN -> ReLU) has a free learned
logit instead, ``P(keep) = sigmoid(logit)``.

In training mode the gate multiplies by a relaxed Bernoulli sample (binary Concrete /
Gumbel-sigmoid): ``sigmoid((logit(P(keep)) + L) / T)`` with logistic noise ``L`` drawn by
:meth:`ScpGate.resample` (once per training step, so every site of a group and every sample
of the batch share one draw); in eval mode, and in training before any draw, it multiplies by
the expectation ``P(keep)``. Since the gate sits after the BN and before the ReLU and the mask
is non-negative, ``ReLU(m * y) = m * ReLU(y)``: the mask acts on the ReLU's output, as in the
paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.gates import Gate, register_gate

__all__ = ["ScpGate"]


@register_gate("scp")
class ScpGate(Gate):
    """Relaxed-Bernoulli mask with keep probability ``Phi(beta / |gamma|)`` of bound BN
    layers, else ``sigmoid(logit)`` of its own logit (starting at ``init``: 0.95 at 3).
    ``temperature`` (a buffer, so schedules and checkpoints see it) is the relaxation's."""

    def __init__(self, size: int, *, temperature: float = 0.5, init: float = 3.0, eps: float = 1e-8) -> None:
        super().__init__(size)
        self.logit = nn.Parameter(torch.full((size,), float(init)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        # The noise of the current step; not persistent: a resumed run draws the next one from
        # the restored RNG, like the uninterrupted run.
        self.register_buffer("noise", torch.zeros(size), persistent=False)
        self.eps = float(eps)
        self.drawn = False
        self.identity = False
        # (BN layer, gate channel -> position in the layer): a plain list, so the layers stay
        # the model's submodules and are not registered a second time under the gate.
        self._norms: list[tuple[nn.Module, Tensor]] = []

    @property
    def bound(self) -> bool:
        """Whether the keep probability comes from BatchNorm layers (else from the own logit)."""
        return bool(self._norms)

    def bind(self, norms: Sequence[tuple[nn.Module, Tensor]]) -> None:
        """Drive the gate by BN layers: ``norms`` holds ``(layer, positions)`` per layer,
        ``positions[c]`` the layer's channel that carries gate channel ``c``. The own logit is
        removed (it would be an unused parameter). Raises ValueError for a layer without
        affine ``weight`` and ``bias`` or positions of the wrong shape."""
        checked = []
        for mod, pos in norms:
            pos = torch.as_tensor(pos, dtype=torch.long)
            if not isinstance(getattr(mod, "weight", None), Tensor) or not isinstance(getattr(mod, "bias", None), Tensor):
                raise ValueError(f"scp gate: {type(mod).__name__} has no affine weight and bias to drive the mask")
            if pos.shape != (self.size,):
                raise ValueError(f"scp gate: positions of shape {tuple(pos.shape)}, expected ({self.size},)")
            checked.append((mod, pos))
        if not checked:
            raise ValueError("scp gate: bind needs at least one BatchNorm layer")
        self._norms = checked
        if "logit" in self._parameters:
            del self.logit

    def log_probabilities(self) -> tuple[Tensor, Tensor]:
        """``(log P(keep), log P(dead))`` per channel, differentiable in the BN parameters
        (or the own logit), computed with ``log_ndtr`` so that far tails stay finite."""
        if not self.bound:
            logit = self.logit
            return torch.nn.functional.logsigmoid(logit), torch.nn.functional.logsigmoid(-logit)
        log_dead = None
        for mod, pos in self._norms:
            pos = pos.to(mod.weight.device)
            z = mod.bias.index_select(0, pos) / (mod.weight.index_select(0, pos).abs() + self.eps)
            term = torch.special.log_ndtr(-z)
            log_dead = term if log_dead is None else log_dead + term
        assert log_dead is not None
        # log(1 - exp(log_dead)), kept below 0 so a channel that is never dead stays finite.
        log_dead = log_dead.clamp(max=-1e-12)
        return torch.log(-torch.expm1(log_dead)), log_dead

    def keep_logit(self) -> Tensor:
        """``log P(keep) - log P(dead)``: the log-odds of keeping each channel."""
        keep, dead = self.log_probabilities()
        return keep - dead

    def keep_probability(self) -> Tensor:
        """``P(keep)`` per channel: ``1 - prod_s Phi(-beta_s / |gamma_s|)`` when bound."""
        return self.log_probabilities()[0].exp()

    def deactivation_probability(self) -> Tensor:
        """``P(dead) = prod_s Phi(-beta_s / |gamma_s|)`` per channel (``sigmoid(-logit)`` unbound)."""
        return self.log_probabilities()[1].exp()

    @torch.no_grad()
    def resample(self) -> None:
        """Draw this step's logistic noise ``log u - log(1 - u)``, ``u ~ U(0, 1)``, from torch's
        global generator (which training checkpoints restore)."""
        u = torch.rand(self.size, device=self.noise.device).clamp_(1e-6, 1 - 1e-6)
        self.noise.copy_(torch.log(u) - torch.log1p(-u))
        self.drawn = True

    def values(self) -> Tensor:
        """In training mode after :meth:`resample`: the relaxed Bernoulli sample; else the
        keep probability; exactly 1 after :meth:`set_identity`."""
        if self.identity:
            return torch.ones(self.size, device=self.noise.device)
        if self.training and self.drawn:
            return torch.sigmoid((self.keep_logit() + self.noise) / self.temperature)
        return self.keep_probability()

    def expected_values(self) -> Tensor:
        """The keep probability (the sample's mean as the temperature goes to 0); 1 after
        :meth:`set_identity`."""
        if self.identity:
            return torch.ones(self.size, device=self.noise.device)
        return self.keep_probability()

    def importance(self) -> np.ndarray:
        """The keep log-odds: the allocator removes the channels most likely to be dead
        (ranked like the probability, without its ties at 0 and 1)."""
        return self.keep_logit().detach().double().cpu().numpy()

    def set_identity(self) -> None:
        """Multiply by exactly 1 from now on (the probabilities were folded into the layers)."""
        self.identity = True
