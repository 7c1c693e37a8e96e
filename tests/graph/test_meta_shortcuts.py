"""The meta-device shortcuts for norms and activations behave like the real kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunekit.graph.tracer import meta_shortcut


def test_norm_shortcut_checks_channels_like_the_kernel() -> None:
    x = torch.empty(2, 8, 4, 4, device="meta")
    w = torch.empty(8, device="meta")
    out = meta_shortcut(F.batch_norm, (x, w, w, w, w), {})
    assert out is not None and out.shape == x.shape and out is not x
    with pytest.raises(RuntimeError, match="6 elements, input has 8 channels"):
        meta_shortcut(F.batch_norm, (x, w, w), {"weight": torch.empty(6, device="meta")})
    with pytest.raises(RuntimeError):  # the real kernel fails the same way
        F.batch_norm(torch.randn(2, 8, 4, 4), torch.zeros(8), torch.ones(8), weight=torch.ones(6))
    with pytest.raises(RuntimeError, match="not divisible"):
        meta_shortcut(F.group_norm, (x, 3), {})


def test_activation_shortcut_respects_inplace() -> None:
    x = torch.empty(2, 8, device="meta")
    assert meta_shortcut(F.relu, (x,), {"inplace": True}) is x
    assert meta_shortcut(F.hardtanh, (x, -1.0, 1.0, True), {}) is x
    out = meta_shortcut(F.hardtanh, (x, -1.0, 1.0, False), {})
    assert out is not x and out.shape == x.shape
    assert meta_shortcut(F.relu, (torch.randn(2, 8),), {}) is None  # real tensors run the real kernel
    assert meta_shortcut(torch.flatten, (x,), {}) is None  # not a shortcut op


def test_layer_shortcuts_match_the_real_kernels() -> None:
    torch.manual_seed(0)
    cases = [
        (F.linear, (torch.randn(2, 5, 7), torch.randn(3, 7), torch.randn(3)), {}),
        (F.conv2d, (torch.randn(2, 4, 9, 11), torch.randn(6, 2, 3, 2), torch.randn(6), (2, 1), (1, 0), (1, 2), 2), {}),
        (F.layer_norm, (torch.randn(2, 3, 8), (8,), torch.randn(8), torch.randn(8)), {}),
    ]
    for func, args, kwargs in cases:
        real = func(*args, **kwargs)
        meta = meta_shortcut(func, [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args], kwargs)
        assert meta is not None and meta.shape == real.shape, func
    bad = [
        (F.linear, (torch.randn(2, 6), torch.randn(3, 7))),
        (F.conv2d, (torch.randn(1, 5, 8, 8), torch.randn(6, 2, 3, 3), None, 1, 0, 1, 2)),
        (F.layer_norm, (torch.randn(2, 7), (8,))),
    ]
    for func, args in bad:
        with pytest.raises(RuntimeError):
            func(*args)
        with pytest.raises(RuntimeError):
            meta_shortcut(func, [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args], {})
