"""The ``two_temperature`` gate kind: a relaxed-Bernoulli channel mask whose selection
probability has a temperature of its own (after Colombo & Gao 2021, :mod:`prunekit.methods.colombo_gao`).

Each channel has an architecture variable ``theta_c``. Two temperatures act on it:

* the **selection temperature** ``tau_p`` makes the selection probability
  ``p_c = sigmoid(theta_c / tau_p)``; annealing it towards 0 drives every ``p_c`` to 0 or 1,
  so the expected cost of the probabilities becomes the cost of a subset;
* the **sampling temperature** ``tau_s`` relaxes the Bernoulli draw with that probability
  (binary Concrete / Gumbel-sigmoid): ``z_c = sigmoid((logit(p_c) + L_c) / tau_s)``
  ``= sigmoid((theta_c / tau_p + L_c) / tau_s)`` with logistic noise ``L_c``, drawn once per
  training step (:meth:`TwoTemperatureGate.resample`) and shared by every site and sample.

In training mode after a draw the gate multiplies by ``z``; otherwise, and in
:meth:`~prunekit.gates.Gate.expected_values` (what the cost model and folding read), by ``p``.
The relaxation and its noise handling are those of the unbound ``scp`` gate
(:class:`prunekit.gates.scp.ScpGate`, whose keep probability is ``sigmoid(logit)``); this kind
only divides the logit by the selection temperature. Both temperatures are buffers, so
schedules can change them and checkpoints keep them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prunekit.errors import PruningError
from prunekit.gates import register_gate
from prunekit.gates.scp import ScpGate

__all__ = ["TwoTemperatureGate"]


@register_gate("two_temperature")
class TwoTemperatureGate(ScpGate):
    """Relaxed-Bernoulli mask with selection probability ``sigmoid(logit / selection_temperature)``
    and sampling temperature ``sample_temperature`` (the ``temperature`` buffer of
    :class:`~prunekit.gates.scp.ScpGate`); the logit starts at ``init``."""

    selection_temperature: Tensor

    def __init__(self, size: int, *, init: float = 1.0, selection_temperature: float = 1.0,
                 sample_temperature: float = 0.5, eps: float = 1e-8) -> None:
        if selection_temperature <= 0 or sample_temperature <= 0:
            raise ValueError(f"two_temperature gate: temperatures must be > 0, got selection "
                             f"{selection_temperature} and sample {sample_temperature}")
        super().__init__(size, temperature=sample_temperature, init=init, eps=eps)
        self.register_buffer("selection_temperature", torch.tensor(float(selection_temperature)))

    def bind(self, norms: Any) -> None:
        """Not available: the selection probabilities are the gate's own variables."""
        raise PruningError("two_temperature gate: its probabilities are its own architecture variables; "
                           "it cannot be bound to BatchNorm layers (that is the scp kind)")

    def log_probabilities(self) -> tuple[Tensor, Tensor]:
        """``(log p, log(1 - p))`` per channel, ``p = sigmoid(logit / selection_temperature)``."""
        z = self.logit / self.selection_temperature
        return F.logsigmoid(z), F.logsigmoid(-z)
