"""Honest cost measurement: parameters, FLOPs, latency and peak memory.

``example_inputs`` may be a tensor, a tuple/list of positional arguments, or a
dict of keyword arguments (see :func:`prunekit.runtime.call_model`).
"""

from prunekit.measure.counts import count_flops, count_params
from prunekit.measure.latency import LatencyStats, measure_latency
from prunekit.measure.memory import peak_memory_bytes
from prunekit.measure.profile import Profile, compare, format_comparison, human, profile
from prunekit.runtime import call_model

__all__ = [
    "LatencyStats",
    "Profile",
    "call_model",
    "compare",
    "count_flops",
    "count_params",
    "format_comparison",
    "human",
    "measure_latency",
    "peak_memory_bytes",
    "profile",
]
