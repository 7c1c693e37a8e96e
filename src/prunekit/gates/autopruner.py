"""The ``autopruner`` gate kind: AutoPruner's channel-selection layer (Luo & Wu, Pattern
Recognition 2020), used by :mod:`prunekit.methods.autopruner`.

In training mode the gate computes one code per channel from the *mini-batch*: mini-batch
pooling (the mean of the activation over the batch and every spatial position) -> FC
(``size -> size``, with bias) -> scaled sigmoid ``v = sigmoid(alpha * x)``; the channels are
multiplied by ``v``, and ``alpha`` (a buffer, raised by a schedule) makes ``v`` binary as it
grows. ``relu=True`` pools ``ReLU(activation)``: the gate sits after a BatchNorm whose output
feeds a ReLU, and since ``v >= 0``, ``ReLU(v * y) = v * ReLU(y)``, so the gate acts on the
ReLU's output and pools it, as the paper's layer after the activation does. A group gated at
several sites (channels coupled through a residual sum) has one code, computed at site 0 (the
first in forward order) and applied at every site of the same pass.

The gate has a life cycle (buffer ``state``, so checkpoints keep it): ``WAITING`` multiplies by
1 (its layer's turn has not come, layer-by-layer training), ``ACTIVE`` computes codes,
``FROZEN`` multiplies by its binary code for good (:meth:`AutoPrunerGate.freeze`). An active
gate keeps running means (momentum ``momentum``) of its codes and of their logits
``alpha * x``: in eval mode it multiplies by the running code (what
:meth:`AutoPrunerGate.expected_values` gives the cost model); the running logit is its
:meth:`AutoPrunerGate.importance` (ranked like the code, without its ties at 0 and 1) and its
sign the default binary code of :meth:`AutoPrunerGate.freeze` (the method may give another).
:attr:`AutoPrunerGate.code` is the code of the current training pass (with its graph, for the
method's keep-rate loss).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.gates import Gate, register_gate

__all__ = ["AutoPrunerGate"]

WAITING, ACTIVE, FROZEN = 0, 1, 2


@register_gate("autopruner")
class AutoPrunerGate(Gate):
    """Mini-batch pooling -> FC -> ``sigmoid(alpha * x)``. ``alpha`` starts at ``alpha``;
    ``init`` (None: PyTorch's default) sets the FC's bias, so that the first codes are about
    ``sigmoid(alpha * init)``; ``momentum`` is that of the running code and logit; ``relu``
    pools ``ReLU`` of the activation; ``state`` starts as ``ACTIVE`` (1) or ``WAITING`` (0)."""

    foldable = False
    input_dependent = True

    def __init__(self, size: int, *, alpha: float = 1.0, init: float | None = None, momentum: float = 0.1,
                 relu: bool = False, state: int = ACTIVE) -> None:
        super().__init__(size)
        if not 0 < momentum <= 1:
            raise ValueError(f"autopruner gate: momentum={momentum} must be in (0, 1]")
        self.fc = nn.Linear(size, size)
        if init is not None:
            with torch.no_grad():
                self.fc.bias.fill_(float(init))
        self.momentum = float(momentum)
        self.relu = bool(relu)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("state", torch.tensor(int(state)))
        self.register_buffer("running_code", torch.ones(size))
        self.register_buffer("running_logit", torch.zeros(size))
        self.register_buffer("last_code", torch.ones(size))
        self.register_buffer("frozen", torch.ones(size))
        self.register_buffer("updates", torch.tensor(0))
        self.code: Tensor | None = None

    def logits(self, x: Tensor, dim: int) -> Tensor:
        """``alpha * FC(mean over batch and positions of x)`` (of ``ReLU(x)`` if ``relu``),
        shape ``(size,)``; ``x`` holds the gate's channels along ``dim``."""
        a = torch.relu(x) if self.relu else x
        pooled = a.movedim(dim, -1).reshape(-1, self.size).mean(0)
        return self.alpha * self.fc(pooled.to(self.fc.weight.dtype))

    def multiplier(self, x: Tensor, dim: int, site: int = 0) -> Tensor:
        """1 while waiting, the binary code once frozen, the running code in eval mode; in
        training mode this pass's code (computed at site 0, reused at the later sites)."""
        state = int(self.state)
        if state == WAITING:
            return x.new_ones(self.size)
        if state == FROZEN:
            return self.frozen
        if not self.training:
            return self.running_code
        if site == 0 or self.code is None:
            logit = self.logits(x, dim)
            self.code = torch.sigmoid(logit)
            self._update(self.code.detach(), logit.detach())
        return self.code

    @torch.no_grad()
    def _update(self, code: Tensor, logit: Tensor) -> None:
        """Fold this pass's code and logit into the running means (the first pass sets them)."""
        m = 1.0 if int(self.updates) == 0 else self.momentum
        self.running_code.mul_(1 - m).add_(code, alpha=m)
        self.running_logit.mul_(1 - m).add_(logit, alpha=m)
        self.last_code.copy_(code)
        self.updates += 1

    def sign_code(self) -> Tensor:
        """The binary code ``running logit > 0`` (the code's limit as ``alpha`` grows)."""
        return (self.running_logit > 0).to(self.frozen.dtype)

    @torch.no_grad()
    def freeze(self, code: Tensor | None = None) -> None:
        """From now on multiply by the binary ``code`` (default :meth:`sign_code`); at least
        the highest-logit channel stays 1, so the layer never goes silent during later training."""
        binary = (self.sign_code() if code is None else torch.as_tensor(code) > 0).to(self.frozen)
        if not bool(binary.any()):
            binary[int(self.running_logit.argmax())] = 1.0
        self.frozen.copy_(binary)
        self.state.fill_(FROZEN)
        self.code = None

    def values(self) -> Tensor:
        """The eval-mode multipliers (:meth:`expected_values`)."""
        return self.expected_values()

    def expected_values(self) -> Tensor:
        """1 while waiting, the binary code once frozen, else the running code."""
        state = int(self.state)
        if state == WAITING:
            return torch.ones_like(self.running_code)
        return self.frozen if state == FROZEN else self.running_code

    def importance(self) -> np.ndarray:
        """The running logit ``alpha * x`` (positive: code towards 1); once frozen, the binary
        code plus the logit squashed into (0, 1) (``2 * code + 1/2 + atan(logit) / pi``), so that
        a ranking across groups removes every code-0 channel before any code-1 one and orders
        each set by its logit."""
        logit = self.running_logit.detach().double()
        if int(self.state) == FROZEN:
            logit = 2 * self.frozen.double() + 0.5 + torch.atan(logit) / np.pi
        return logit.cpu().numpy()
