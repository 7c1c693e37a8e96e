"""The meta-device shortcuts for norms and activations behave like the real kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunekit.graph.meta import meta_shortcut


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


def _meta(args: tuple) -> list:
    return [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]


def test_binary_pool_and_mean_shortcuts_match_the_real_kernels() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 8, 5, 5), torch.randn(1, 8, 1, 1)
    half, ints = torch.randn(8, 1, 1).half(), torch.arange(5)
    cases = [
        (torch.add, (a, b), {}), (torch.Tensor.__mul__, (a, b), {}), (torch.Tensor.__rsub__, (a, 2), {}),
        (torch.mul, (a, half), {}), (torch.add, (b, a), {"alpha": 2}),
        (torch.Tensor.__radd__, (ints, 1.5), {}),
        (F.adaptive_avg_pool2d, (a, 1), {}), (F.adaptive_avg_pool2d, (a, (3, None)), {}),
        (F.adaptive_max_pool2d, (a, (2, 2)), {}),
        (torch.mean, (a, (2, 3)), {"keepdim": True}), (torch.Tensor.mean, (a, -1), {}), (torch.mean, (a, [1, 2]), {}),
    ]
    for func, args, kwargs in cases:
        real = func(*args, **kwargs)
        meta = meta_shortcut(func, _meta(args), kwargs)
        assert meta is not None, func
        assert meta.shape == real.shape and meta.dtype == real.dtype, (func, meta.shape, real.shape, meta.dtype)


def test_inplace_binary_shortcut_returns_its_input_and_declines_what_it_cannot_model() -> None:
    x = torch.empty(2, 8, 4, 4, device="meta")
    y = torch.empty(8, 1, 1, device="meta")
    assert meta_shortcut(torch.Tensor.__iadd__, (x, y), {}) is x
    assert meta_shortcut(torch.Tensor.mul_, (x, 2.0), {}) is x
    # broadcasting would grow the in-place operand, or change its dtype: the real kernel decides
    assert meta_shortcut(torch.Tensor.add_, (y, x), {}) is None
    assert meta_shortcut(torch.Tensor.add_, (torch.empty(3, dtype=torch.long, device="meta"), 0.5), {}) is None
    # channels-last operands and out= keep the real kernel (output layout / semantics)
    cl = torch.empty(2, 8, 4, 4).to(memory_format=torch.channels_last).to("meta")
    assert meta_shortcut(torch.add, (cl, cl), {}) is None
    assert meta_shortcut(torch.add, (x, x), {"out": x}) is None
    # integer true division promotes to float: left to the real kernel
    assert meta_shortcut(torch.Tensor.__truediv__, (torch.empty(5, dtype=torch.long, device="meta"), 2), {}) is None
    with pytest.raises(RuntimeError):
        torch.randn(2, 3) + torch.randn(4)
    with pytest.raises(RuntimeError, match="do not broadcast"):
        meta_shortcut(torch.add, (torch.empty(2, 3, device="meta"), torch.empty(4, device="meta")), {})
