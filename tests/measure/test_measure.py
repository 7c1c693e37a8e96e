"""Tests for prunekit.measure: hand-computed oracles for params/FLOPs, latency sanity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from prunekit.measure import (
    LatencyStats,
    Profile,
    call_model,
    compare,
    count_flops,
    count_params,
    format_comparison,
    human,
    measure_latency,
    peak_memory_bytes,
    profile,
)

# --------------------------------------------------------------------------- #
# count_params
# --------------------------------------------------------------------------- #


def test_count_params_hand_computed() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),  # 8*3*3*3 + 8 = 224
        nn.BatchNorm2d(8),  # weight + bias = 16 (running stats are buffers)
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 4),  # 8*4 + 4 = 36
    )
    assert count_params(net) == 224 + 16 + 36


def test_count_params_excludes_buffers() -> None:
    bn = nn.BatchNorm1d(5)
    assert sum(b.numel() for b in bn.buffers()) > 0
    assert count_params(bn) == 10


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)  # 40
        self.head = nn.Linear(4, 10, bias=False)  # 40, tied below
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx))


def test_count_params_tied_weight_counted_once() -> None:
    assert count_params(_Tied()) == 40


def test_count_params_distinct_parameter_objects_same_storage_counted_once() -> None:
    a = nn.Linear(4, 3, bias=False)
    b = nn.Linear(4, 3, bias=False)
    b.weight = nn.Parameter(a.weight)  # new Parameter object, same storage view
    assert b.weight is not a.weight
    assert b.weight.data_ptr() == a.weight.data_ptr()
    assert count_params(nn.ModuleList([a, b])) == 12


def test_count_params_untied_same_shape_counted_twice() -> None:
    a = nn.Linear(4, 3, bias=False)
    b = nn.Linear(4, 3, bias=False)
    assert count_params(nn.ModuleList([a, b])) == 24


# --------------------------------------------------------------------------- #
# count_flops
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bias", [True, False])
def test_conv_flops_hand_computed_bias_not_counted(bias: bool) -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
    # 2 * C_out * C_in * kH * kW * H_out * W_out; FlopCounterMode adds nothing for bias.
    assert count_flops(conv, torch.randn(1, 3, 16, 16)) == 2 * 8 * 3 * 3 * 3 * 16 * 16


def test_conv_flops_stride_and_groups() -> None:
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
    # Output 8x8; each output channel sees C_in/groups = 2 input channels.
    assert count_flops(conv, torch.randn(2, 8, 16, 16)) == 2 * 2 * 16 * 2 * 3 * 3 * 8 * 8


@pytest.mark.parametrize("bias", [True, False])
def test_linear_flops_hand_computed(bias: bool) -> None:
    lin = nn.Linear(10, 7, bias=bias)
    assert count_flops(lin, torch.randn(5, 10)) == 2 * 10 * 7 * 5


def test_two_layer_flops_is_sum() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    expected = 2 * 8 * 3 * 3 * 3 * 16 * 16 + 2 * 8 * 4 * 1
    assert count_flops(net, torch.randn(1, 3, 16, 16)) == expected


def test_elementwise_norm_pool_count_zero() -> None:
    # Pins FlopCounterMode's convention so a torch upgrade that changes it is noticed.
    x = torch.randn(2, 4, 8, 8)
    for m in (nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)):
        assert count_flops(m, x) == 0, type(m).__name__


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        out = self.lin(a)
        return out if b is None else out + self.lin(b)


def test_call_model_forms() -> None:
    m = _TwoInputs()
    a, b = torch.randn(2, 6), torch.randn(2, 6)
    ref = m(a, b)
    assert torch.equal(call_model(m, (a, b)), ref)
    assert torch.equal(call_model(m, [a, b]), ref)
    assert torch.equal(call_model(m, {"a": a, "b": b}), ref)
    assert torch.equal(call_model(m, a), m(a))


def test_call_model_dict_is_by_keyword_not_position() -> None:
    m = _TwoInputs()
    a = torch.randn(2, 6)
    # With b=None the result depends on which tensor binds to `a`.
    assert torch.equal(call_model(m, {"b": None, "a": a}), m(a))


def test_example_input_forms_give_same_flops() -> None:
    m = _TwoInputs()
    x = torch.randn(4, 6)
    one = 2 * 6 * 3 * 4
    assert count_flops(m, x) == one
    assert count_flops(m, (x,)) == one
    assert count_flops(m, [x]) == one
    assert count_flops(m, {"a": x}) == one
    # Two inputs run the Linear twice; tuple and dict must agree.
    assert count_flops(m, (x, x)) == count_flops(m, {"a": x, "b": x}) == 2 * one


def test_count_flops_runs_eval_no_grad_and_restores_modes() -> None:
    m = _TwoInputs()
    m.train()
    count_flops(m, torch.randn(1, 6))
    assert m.seen_training == [False]
    assert m.seen_grad == [False]
    assert m.training and m.lin.training

    # A mixed state (training model, one frozen submodule) is restored exactly.
    m.lin.eval()
    count_flops(m, torch.randn(1, 6))
    assert m.training and not m.lin.training

    m.eval()
    count_flops(m, torch.randn(1, 6))
    assert not m.training


# --------------------------------------------------------------------------- #
# latency / memory
# --------------------------------------------------------------------------- #


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(512, hidden), nn.ReLU(), nn.Linear(hidden, 512))


def test_latency_more_work_is_slower() -> None:
    x = torch.randn(64, 512)
    small = measure_latency(_mlp(64), x, threads=1, min_run_time=0.2)
    wide = measure_latency(_mlp(512), x, threads=1, min_run_time=0.2)  # 8x the FLOPs
    assert wide.median_ms > small.median_ms


def test_latency_stats_sane_and_state_restored() -> None:
    m = _TwoInputs()
    m.train()
    threads_before = torch.get_num_threads()
    x = torch.randn(16, 6)
    st = measure_latency(m, x, threads=1, warmup=2, min_run_time=0.05)
    assert isinstance(st, LatencyStats)
    assert st.median_ms > 0 and st.mean_ms > 0
    assert st.iqr_ms >= 0
    assert st.runs >= 1
    assert st.threads == 1
    assert st.device == "cpu"
    assert st.batch_size == 16
    assert st.peak_memory_bytes is None
    assert st.throughput == pytest.approx(16 / (st.median_ms / 1e3))
    # warm-up + timed calls all happened in eval mode without autograd
    assert len(m.seen_training) >= 2 + st.runs
    assert not any(m.seen_training) and not any(m.seen_grad)
    assert m.training and m.lin.training
    assert torch.get_num_threads() == threads_before


def test_latency_warmup_calls_precede_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.benchmark as benchmark

    m = _TwoInputs()
    calls_at_timing: list[int] = []
    threads_at_warmup: list[int] = []
    real_timer = benchmark.Timer

    class SpyTimer(real_timer):  # type: ignore[misc, valid-type]
        def blocked_autorange(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls_at_timing.append(len(m.seen_training))
            return super().blocked_autorange(*args, **kwargs)

    orig_forward = m.forward

    def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not calls_at_timing:
            threads_at_warmup.append(torch.get_num_threads())
        return orig_forward(*args, **kwargs)

    monkeypatch.setattr(m, "forward", forward)
    monkeypatch.setattr(benchmark, "Timer", SpyTimer)
    measure_latency(m, torch.randn(2, 6), threads=1, warmup=5, min_run_time=0.02)
    assert calls_at_timing == [5]
    assert threads_at_warmup == [1] * 5


def test_latency_batch_size_from_dict_and_scalar() -> None:
    m = _TwoInputs()
    st = measure_latency(m, {"a": torch.randn(3, 6)}, threads=1, warmup=0, min_run_time=0.02)
    assert st.batch_size == 3

    class Scale(nn.Module):
        def forward(self, s: torch.Tensor) -> torch.Tensor:
            return s * 2

    st = measure_latency(Scale(), torch.tensor(1.0), threads=1, warmup=0, min_run_time=0.02)
    assert st.batch_size == 1


def test_latency_rejects_bad_args() -> None:
    m = nn.Linear(2, 2)
    x = torch.randn(1, 2)
    with pytest.raises(ValueError):
        measure_latency(m, x, threads=0)
    with pytest.raises(ValueError):
        measure_latency(m, x, min_run_time=0)
    with pytest.raises(ValueError):
        measure_latency(m, x, device="meta")  # model is on cpu


def test_peak_memory_none_on_cpu() -> None:
    assert peak_memory_bytes(nn.Linear(4, 4), torch.randn(2, 4)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_and_latency() -> None:
    m = nn.Linear(1024, 1024).cuda()
    x = torch.randn(256, 1024)  # on CPU: moved to the model's device
    peak = peak_memory_bytes(m, x)
    weights = 1024 * 1024 * 4
    assert peak is not None and peak >= weights + 2 * 256 * 1024 * 4
    st = measure_latency(m, x, min_run_time=0.1)
    assert st.device.startswith("cuda")
    assert st.peak_memory_bytes is not None and st.peak_memory_bytes >= weights


# --------------------------------------------------------------------------- #
# Profile / compare / formatting
# --------------------------------------------------------------------------- #


def _lat(median_ms: float, iqr_ms: float = 0.5) -> LatencyStats:
    return LatencyStats(
        median_ms=median_ms,
        iqr_ms=iqr_ms,
        mean_ms=median_ms,
        runs=10,
        threads=2,
        device="cpu",
        batch_size=4,
    )


def test_compare_ratios() -> None:
    before = Profile(params=1000, flops=4000, latency=_lat(20.0), peak_memory=None)
    after = Profile(params=250, flops=1000, latency=_lat(8.0), peak_memory=None)
    r = compare(before, after)
    assert r["params"] == pytest.approx(0.25)
    assert r["flops"] == pytest.approx(0.25)
    assert r["latency"] == pytest.approx(0.4)
    assert r["speedup"] == pytest.approx(2.5)


def test_compare_none_latency_and_zero() -> None:
    before = Profile(params=0, flops=10, latency=None, peak_memory=None)
    after = Profile(params=0, flops=5, latency=_lat(1.0), peak_memory=None)
    r = compare(before, after)
    assert "latency" not in r and "speedup" not in r
    assert math.isnan(r["params"])
    assert r["flops"] == pytest.approx(0.5)
    text = format_comparison(before, after)
    assert "latency" in text and "-" in text


def test_format_comparison_table() -> None:
    before = Profile(params=25_557_032, flops=8_178_368_512, latency=_lat(73.7), peak_memory=None)
    after = Profile(params=11_689_512, flops=3_628_146_688, latency=_lat(33.2), peak_memory=None)
    text = format_comparison(before, after)
    lines = text.splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == ["params", "FLOPs", "latency"]
    assert "before" in lines[0] and "after" in lines[0] and "ratio" in lines[0]
    assert len({len(ln) for ln in lines[:4]}) == 1  # aligned columns
    assert "25.56M" in lines[1] and "11.69M" in lines[1]
    assert f"{11_689_512 / 25_557_032:.3f}x" in lines[1]
    assert "speedup 2.22x" in text


def test_profile_str_and_dict() -> None:
    p = Profile(params=25_557_032, flops=8_210_000_000, latency=_lat(31.2, 0.4), peak_memory=None)
    assert p.macs == 4_105_000_000
    s = str(p)
    assert "params 25.56M" in s
    assert "FLOPs 8.21G (MACs 4.11G)" in s
    assert "31.2 ms ± 0.4" in s and "2 threads" in s and "cpu" in s
    d = json.loads(json.dumps(p.to_dict()))
    assert d["params"] == 25_557_032 and d["macs"] == 4_105_000_000
    assert d["latency"]["median_ms"] == 31.2 and d["latency"]["throughput"] > 0
    no_lat = Profile(params=10, flops=20, latency=None, peak_memory=None)
    assert "latency" not in str(no_lat)
    assert json.loads(json.dumps(no_lat.to_dict()))["latency"] is None


def test_profile_end_to_end() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    net.train()
    x = torch.randn(2, 3, 16, 16)
    p = profile(net, x, latency=False)
    assert p.params == (8 * 27 + 8) + (4 * 8 + 4)
    assert p.flops == 2 * 2 * 16 * 16 * (8 * 27 + 4 * 8)
    assert p.latency is None and p.peak_memory is None
    assert human(p.params) in str(p)
    p2 = profile(net, x, threads=1, min_run_time=0.05)
    assert p2.latency is not None and p2.latency.threads == 1 and p2.latency.batch_size == 2
    assert net.training


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0"),
        (512, "512"),
        (0.5, "0.50"),
        (1_000, "1.00K"),
        (1_234, "1.23K"),
        (999_999, "1.00M"),  # rounding carries into the next unit
        (25_557_032, "25.56M"),
        (8.21e9, "8.21G"),
        (3.5e12, "3.50T"),
        (2e15, "2000.00T"),
        (-1_500, "-1.50K"),
    ],
)
def test_human(n: float, expected: str) -> None:
    assert human(n) == expected
