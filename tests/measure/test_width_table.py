"""The exact-width latency table: layers rebuilt at exactly the widths asked, one timing per
layer configuration, the estimate summed by hand; the ONNX Runtime path computes what the
layer computes. Timers here are hand-made functions: nothing is timed."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from prunekit.measure.width_table import LayerSpec, _layer_at, build_width_table

X = torch.randn(1, 4, 8, 8)


class _Counting:
    """A timer that records what it was asked: ms = cin * cout / 100 + 1."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, spec: LayerSpec, cin: int, cout: int) -> float:
        self.calls.append((spec.name, cin, cout))
        return cin * cout / 100 + 1


def _net() -> nn.Sequential:
    # Two identical 16 -> 16 convs on the same shape share a key; a depthwise and a grouped conv.
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1, groups=4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3)).eval()


def test_layers_sharing_a_configuration_are_timed_once() -> None:
    timer = _Counting()
    table = build_width_table(_net(), X, timer=timer)
    assert table.layers["1"].key == table.layers["2"].key != table.layers["0"].key
    assert sorted(c for c in timer.calls if c[0] in ("1", "2")) == [("1", 16, 16)]  # "2" reuses "1"'s timing
    n = len(timer.calls)
    table.layer_ms("2", 8, 8)
    table.layer_ms("1", 8, 8)  # cached under the shared key
    assert len(timer.calls) == n + 1


def test_estimate_is_the_scaled_sum_of_layers() -> None:
    model = _net()
    table = build_width_table(model, X, timer=_Counting(), model_ms=50.0)
    small = _net()
    small[0], small[1] = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
    ms = lambda cin, cout: cin * cout / 100 + 1  # noqa: E731
    full = ms(4, 16) + 3 * ms(16, 16) + ms(16, 32) + ms(32, 3)
    now = ms(4, 8) + ms(8, 16) + 2 * ms(16, 16) + ms(16, 32) + ms(32, 3)
    assert table.estimate(small) == pytest.approx(50.0 * now / full)
    assert table.estimate(model) == pytest.approx(50.0)
    # Without a measured model_ms the estimate is the sum of the layers itself.
    assert build_width_table(model, X, timer=_Counting()).estimate(small) == pytest.approx(now)


@pytest.mark.parametrize("name,cin,cout", [("0", 3, 13), ("3", 11, 11), ("4", 12, 20), ("7", 17, 3)])
def test_layers_are_rebuilt_at_exact_widths(name: str, cin: int, cout: int) -> None:
    model = _net()
    spec = build_width_table(model, X, timer=_Counting()).layers[name]
    layer = _layer_at(spec, cin, cout)
    got = (layer.in_channels, layer.out_channels) if isinstance(layer, nn.Conv2d) else (layer.in_features,
                                                                                         layer.out_features)
    assert got == (cin, cout)
    orig = model.get_submodule(name)
    if isinstance(orig, nn.Conv2d):  # same configuration; a depthwise conv stays depthwise
        assert (layer.kernel_size, layer.padding) == (orig.kernel_size, orig.padding)
        assert layer.groups == (cin if orig.groups == orig.in_channels else orig.groups)


def test_a_width_the_layer_cannot_take_is_refused() -> None:
    spec = build_width_table(_net(), X, timer=_Counting()).layers["4"]  # 4 groups
    with pytest.raises(ValueError, match="cannot be built at widths \\(10, 20\\)"):
        _layer_at(spec, 10, 20)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="onnxruntime not installed")
def test_onnx_session_computes_the_layer() -> None:
    """What OnnxTimer times is the layer itself: its ONNX Runtime output equals PyTorch's."""
    from prunekit.measure.onnx_latency import onnx_session

    torch.manual_seed(0)
    layer = nn.Conv2d(6, 10, 3, padding=1, groups=2).eval()
    x = torch.randn(2, 6, 8, 8)
    session, feeds = onnx_session(layer, x, threads=1)
    got = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        assert torch.allclose(got, layer(x), atol=1e-5)
