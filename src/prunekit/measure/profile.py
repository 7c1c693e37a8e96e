"""One-call model profile (params, FLOPs, latency, memory) and before/after comparison."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from torch import nn

from prunekit.measure.counts import count_flops, count_params
from prunekit.measure.latency import LatencyStats, measure_latency
from prunekit.measure.memory import peak_memory_bytes

__all__ = ["Profile", "profile", "compare", "format_comparison", "human"]

logger = logging.getLogger(__name__)

_SUFFIXES = ("", "K", "M", "G", "T")


def human(n: float) -> str:
    """Format a count with a K/M/G/T suffix (powers of 1000) and 2 decimals.

    Values below 1000 have no suffix; integral ones print without decimals
    (``human(512) == "512"``), others with 2 (``human(0.5) == "0.50"``).
    Values beyond the T range stay in T (``human(2e15) == "2000.00T"``).

    Returns:
        The formatted string, e.g. ``human(25_557_032) == "25.56M"``.
    """
    if isinstance(n, float) and not math.isfinite(n):
        return str(n)
    sign = "-" if n < 0 else ""
    v = float(abs(n))
    if v < 1000:
        return f"{sign}{int(v)}" if v == int(v) else f"{sign}{v:.2f}"
    i = 0
    while i < len(_SUFFIXES) - 1 and round(v, 2) >= 1000:
        v /= 1000.0
        i += 1
    return f"{sign}{v:.2f}{_SUFFIXES[i]}"


def _human_bytes(n: int) -> str:
    """Format a byte count in binary units (KiB/MiB/GiB/TiB), 2 decimals."""
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if round(v, 2) < 1024:
            return f"{v:.0f} B" if unit == "B" else f"{v:.2f} {unit}"
        v /= 1024.0
    return f"{v:.2f} TiB"


def _ms_decimals(ms: float) -> int:
    """Decimals that show ~3 significant digits of a millisecond value."""
    if ms >= 10:
        return 1
    if ms >= 1:
        return 2
    return 3


def _fmt_latency(lat: LatencyStats) -> str:
    """Format median and IQR with the same precision, chosen from the median."""
    d = _ms_decimals(lat.median_ms)
    return f"{lat.median_ms:.{d}f} ms ± {lat.iqr_ms:.{d}f}"


@dataclasses.dataclass(frozen=True)
class Profile:
    """Cost profile of a model on one example input.

    Attributes:
        params: Unique parameter count.
        flops: FLOPs of one forward pass (2 per multiply-add).
        latency: Latency statistics, or ``None`` if not measured.
        peak_memory: Peak CUDA bytes of one forward, or ``None`` (CPU / not measured).
    """

    params: int
    flops: int
    latency: LatencyStats | None
    peak_memory: int | None

    @property
    def macs(self) -> int:
        """Multiply-accumulates: ``flops // 2``."""
        return self.flops // 2

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict; ``latency`` is a nested dict or ``None``."""
        return {
            "params": self.params,
            "flops": self.flops,
            "macs": self.macs,
            "latency": None if self.latency is None else self.latency.to_dict(),
            "peak_memory": self.peak_memory,
        }

    def __str__(self) -> str:
        parts = [
            f"params {human(self.params)}",
            f"FLOPs {human(self.flops)} (MACs {human(self.macs)})",
        ]
        if self.latency is not None:
            lat = self.latency
            parts.append(
                f"latency {_fmt_latency(lat)} "
                f"(median ± IQR, {lat.threads} thread{'' if lat.threads == 1 else 's'}, {lat.device})"
            )
        if self.peak_memory is not None:
            parts.append(f"peak memory {_human_bytes(self.peak_memory)}")
        return " | ".join(parts)


def profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    latency: bool = True,
    threads: int | None = None,
    min_run_time: float = 0.5,
) -> Profile:
    """Measure parameters, FLOPs, optionally latency, and (on CUDA) peak memory.

    Each measurement runs in eval mode under ``torch.no_grad()``; the model's
    train/eval flags are restored afterwards and the model is not moved.

    Args:
        model: Module to profile.
        example_inputs: Tensor, tuple/list of positional args or dict of kwargs.
        latency: Whether to time the model (the slow part).
        threads: CPU threads for timing; ``None`` uses ``torch.get_num_threads()``.
        min_run_time: Minimum seconds of timed execution.

    Returns:
        A :class:`Profile`.
    """
    params = count_params(model)
    flops = count_flops(model, example_inputs)
    lat = (
        measure_latency(model, example_inputs, threads=threads, min_run_time=min_run_time)
        if latency
        else None
    )
    mem = peak_memory_bytes(model, example_inputs)
    result = Profile(params=params, flops=flops, latency=lat, peak_memory=mem)
    logger.info("profile: %s", result)
    return result


def _ratio(num: float, den: float) -> float:
    """``num / den``, NaN when the denominator is 0 (ratio undefined)."""
    return num / den if den else math.nan


def compare(before: Profile, after: Profile) -> dict[str, float]:
    """Ratios of ``after`` to ``before``.

    Keys ``"params"`` and ``"flops"`` are always present (after / before).
    ``"latency"`` (after median / before median) and ``"speedup"`` (before
    median / after median) are present only when both profiles have latency.
    A ratio with a zero denominator is NaN.

    Returns:
        A dict mapping metric name to ratio.
    """
    out = {
        "params": _ratio(after.params, before.params),
        "flops": _ratio(after.flops, before.flops),
    }
    if before.latency is not None and after.latency is not None:
        out["latency"] = _ratio(after.latency.median_ms, before.latency.median_ms)
        out["speedup"] = _ratio(before.latency.median_ms, after.latency.median_ms)
    return out


def format_comparison(before: Profile, after: Profile) -> str:
    """Render a small aligned table of params/FLOPs/latency: before, after, ratio.

    Missing latency shows as ``-``. When both latencies exist a final
    ``speedup`` line (before / after median) is appended.

    Returns:
        The multi-line table as a string (no trailing newline).
    """
    r = compare(before, after)

    def lat(p: Profile) -> str:
        if p.latency is None:
            return "-"
        return f"{p.latency.median_ms:.{_ms_decimals(p.latency.median_ms)}f} ms"

    def ratio(key: str) -> str:
        v = r.get(key)
        return "-" if v is None or math.isnan(v) else f"{v:.3f}x"

    rows = [
        ("", "before", "after", "ratio"),
        ("params", human(before.params), human(after.params), ratio("params")),
        ("FLOPs", human(before.flops), human(after.flops), ratio("flops")),
        ("latency", lat(before), lat(after), ratio("latency")),
    ]
    w0 = max(len(row[0]) for row in rows)
    widths = [max(len(row[i]) for row in rows) for i in range(1, 4)]
    lines = [
        row[0].ljust(w0) + "".join("  " + c.rjust(w) for c, w in zip(row[1:], widths))
        for row in rows
    ]
    if "speedup" in r and not math.isnan(r["speedup"]):
        lines.append(f"speedup {r['speedup']:.2f}x")
    return "\n".join(line.rstrip() for line in lines)
