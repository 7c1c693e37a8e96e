"""Least-squares refit of the second factor of factorised layers on calibration data.

A factorised layer is ``second(first(x))``. SVD makes the pair the best rank-r approximation
of the *weight*; the refit instead makes it reproduce the original layer's *outputs* on real
inputs: with ``first`` fixed, ``second`` is linear in its weights, so

    min_{W2, b2}  sum || y_orig - W2 z - b2 ||^2,    z = rows of first(x_decomposed)

has a closed form (:func:`prunekit.recover.reconstruct.solve_least_squares`, from the sums of
:class:`prunekit.features.Moments`). The layers are refitted one after the other in execution
order, ``x_decomposed`` coming from the decomposed model with the earlier layers already
refitted and ``y_orig`` from the original model, so errors do not accumulate (as
``reconstruct(mode="sequential")``). A second factor without a bias is refitted without an
intercept. The SVD factor is one candidate of the least-squares problem, so a layer's
calibration error can only go down (up to the small ridge).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunekit.features import Batch, layer_moments, reconstructable
from prunekit.recover.reconstruct import solve_least_squares
from prunekit.runtime import model_mode

__all__ = ["refit_second_factors"]


def refit_second_factors(decomposed: nn.Module, original: nn.Module, names: Sequence[str],
                         batches: Sequence[Batch]) -> list[str]:
    """Refit, in place, the second factor (``decomposed.<name>[1]``) of every factorised layer
    in ``names`` (in execution order) so that it reproduces ``original.<name>``'s output on
    ``batches``; returns the names refitted (those whose second factor least squares can
    rewrite: linear, or a conv with explicit zero padding)."""
    done = []
    with model_mode(decomposed, "eval"), model_mode(original, "eval"), torch.no_grad():
        for name in names:
            second = decomposed.get_submodule(name)[1]
            if not reconstructable(second):
                continue
            mom = layer_moments(decomposed, second, original, original.get_submodule(name), batches)
            assert mom.xy is not None
            w, b = solve_least_squares(mom.xx, mom.xy, intercept=second.bias is not None)
            second.weight.copy_(w.reshape(second.weight.shape).to(second.weight))
            if second.bias is not None:
                second.bias.copy_(b.to(second.bias))
            done.append(name)
    return done
