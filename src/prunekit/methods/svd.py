"""Post-hoc SVD decomposition (channel-wise or spatial), the baseline TRP is compared against.

What it does: the trained network's conv (and, channel-wise, linear) layers are factorised by
truncated SVD of their reshaped weights, with :func:`prunekit.decompose.decompose`:

* channel-wise: the ``N x (C k k)`` matrix gives a ``k x k`` conv ``C -> r`` then a 1x1 conv
  ``r -> N`` (the channel decomposition of Zhang et al. 2016, without their reconstruction
  through the nonlinearity);
* spatial: the ``(C k) x (N k)`` matrix gives a ``k x 1`` conv then a ``1 x k`` conv (the
  closed-form vertical/horizontal decomposition of Tai et al. 2016, AIMET's spatial SVD).

Ranks come from an energy or value threshold, or are allocated under a FLOPs/params budget.
With ``refit=True`` the second factor of each layer is refitted by least squares to the
original layer's outputs on the calibration batches; ``allocation="aimet"`` or ``"table"``
allocates from a per-layer sensitivity table measured on them. Nothing is trained: fine-tune
the result (Tai et al. train the decomposed network further; Zhang et al. fine-tune).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from prunekit.decompose import decompose
from prunekit.errors import PruningError
from prunekit.methods import MethodResult, budget_config, register, take_batches

__all__ = ["svd"]


@register("svd")
def svd(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None, batches: int = 8,
        mode: str = "channel", energy: float | None = None, threshold: float | None = None, refit: bool = False,
        allocation: str = "weights", sensitivity: Any = None, **kwargs: Any) -> MethodResult:
    """Factorise ``model``'s layers (a copy) by truncated SVD in ``mode`` (``"channel"`` or
    ``"spatial"``): under the budget of the keywords (``target_flops`` / ``target_params``,
    ``ignore``, ``round_to``, ``config``) or, without one, by ``energy`` or ``threshold``.
    ``loader``'s first ``batches`` batches refit the second factors (``refit=True``) and measure
    the sensitivity table of ``allocation="table" | "aimet"`` (or pass ``sensitivity``, a
    table or its JSON path). Returns the model, its plan of Replace steps and ``info`` (the
    decomposition record of the plan's meta)."""
    budget = budget_config(kwargs, "svd")
    target = budget.target
    if target is not None and target[0] == "latency":
        raise PruningError("svd: target_latency is not supported (use target_flops or target_params)")
    rule: dict[str, Any]
    if target is not None:
        rule = {f"target_{target[0]}": target[1]}
    elif energy is not None or threshold is not None:
        rule = {"energy": energy} if energy is not None else {"threshold": threshold}
    else:
        raise PruningError("method 'svd': give target_flops / target_params, energy= or threshold=")
    data = None
    if refit or (allocation != "weights" and loader is not None):
        data = take_batches(loader, batches, "svd")  # refit without data raises here, naming the method
    small, plan = decompose(model, example_inputs, mode=mode, round_to=budget.round_to, ignore=budget.ignore or (),
                            allocation=allocation, sensitivity=sensitivity, batches=batches,
                            refit_loader=data if refit else None, calib_loader=data, **rule)
    return MethodResult(small, plan.with_meta(method="svd"), dict(plan.meta["decompose"]))
