"""The ``bn`` criterion asks the layer handlers which layers are normalisations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import criteria

NORMS = {
    "batch_norm": (lambda: nn.BatchNorm1d(4), (2, 3)),
    "layer_norm": (lambda: nn.LayerNorm(4), (2, 3)),
    **({"rms_norm": (lambda: nn.RMSNorm(4), (2, 3))} if hasattr(nn, "RMSNorm") else {}),
}


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_bn_scores_the_scale_of_every_handled_norm(kind: str) -> None:
    """Oracle: the norm's |weight| per channel (set by hand), whatever its type; before the
    handlers answered, RMSNorm fell back to the L2 norm of the whole group."""
    build, shape = NORMS[kind]
    model = nn.Sequential(nn.Linear(3, 4), build(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -3.0, 2.0, -0.25]))
    (group,) = pk.trace(model, torch.randn(*shape)).groups_of("0")
    np.testing.assert_allclose(criteria.get("bn")(model, group), [0.5, 3.0, 2.0, 0.25])


def test_bn_falls_back_to_l2_without_a_norm() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    (group,) = pk.trace(model, torch.randn(2, 3)).groups_of("0")
    np.testing.assert_allclose(criteria.get("bn")(model, group), criteria.get("l2")(model, group))
