"""The meta-device shortcuts for norms and activations behave like the real kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunekit.graph.tracer import meta_norm


def test_norm_shortcut_checks_channels_like_the_kernel() -> None:
    x = torch.empty(2, 8, 4, 4, device="meta")
    w = torch.empty(8, device="meta")
    out = meta_norm(F.batch_norm, (x, w, w, w, w), {})
    assert out is not None and out.shape == x.shape and out is not x
    with pytest.raises(RuntimeError, match="6 elements, input has 8 channels"):
        meta_norm(F.batch_norm, (x, w, w), {"weight": torch.empty(6, device="meta")})
    with pytest.raises(RuntimeError):  # the real kernel fails the same way
        F.batch_norm(torch.randn(2, 8, 4, 4), torch.zeros(8), torch.ones(8), weight=torch.ones(6))
    with pytest.raises(RuntimeError, match="not divisible"):
        meta_norm(F.group_norm, (x, 3), {})


def test_activation_shortcut_respects_inplace() -> None:
    x = torch.empty(2, 8, device="meta")
    assert meta_norm(F.relu, (x,), {"inplace": True}) is x
    assert meta_norm(F.hardtanh, (x, -1.0, 1.0, True), {}) is x
    out = meta_norm(F.hardtanh, (x, -1.0, 1.0, False), {})
    assert out is not x and out.shape == x.shape
    assert meta_norm(F.relu, (torch.randn(2, 8),), {}) is None  # real tensors run the real kernel
    assert meta_norm(torch.flatten, (x,), {}) is None  # not a shortcut op
