"""Run reports: ``report.json`` (machine-readable) and ``report.md`` (for people)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from prunekit.measure import human
from prunekit.persist import atomic_write


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded next to every figure."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _row(name: str, before: float | None, after: float | None, fmt: Any) -> str:
    if before is None or after is None:
        return f"| {name} | {fmt(before) if before is not None else '-'} | {fmt(after) if after is not None else '-'} | - |"
    ratio = after / before if before else float("nan")
    return f"| {name} | {fmt(before)} | {fmt(after)} | {ratio:.3f} |"


def markdown(report: dict[str, Any]) -> str:
    """Human-readable summary of a report with before/after profiles (and accuracy if any)."""
    b, a = report.get("before", {}), report.get("after", {})
    data = f" on {report['data']}" if report.get("data") else ""
    lines = [f"# prunekit {report.get('command', 'run')}: {report.get('model', '')}{data}", ""]
    lines += ["| metric | before | after | after/before |", "|---|---|---|---|"]
    lines.append(_row("params", b.get("params"), a.get("params"), human))
    lines.append(_row("FLOPs", b.get("flops"), a.get("flops"), human))
    lat_b = (b.get("latency") or {}).get("median_ms")
    lat_a = (a.get("latency") or {}).get("median_ms")
    lines.append(_row("latency (ms, median)", lat_b, lat_a, lambda v: f"{v:.2f}"))
    for key in ("top1", "top5", "loss"):
        if key in b or key in a:
            lines.append(_row(key, b.get(key), a.get(key), lambda v: f"{v:.4f}"))
    plan = report.get("plan") or {}
    if plan:
        lines += ["", f"Groups pruned: {plan.get('groups_pruned')}/{plan.get('groups')}, channels removed "
                      f"{plan.get('channels_removed')}/{plan.get('channels')}, criterion `{plan.get('criterion')}`."]
        for r in plan.get("repairs", [])[:20]:
            lines.append(f"- kept: {r}")
    env = report.get("environment", {})
    if env:
        threads = env.get("cpu_threads")
        lines += ["", f"Measured with torch {env.get('torch')} on {env.get('processor')}, {threads} "
                      f"thread{'' if threads == 1 else 's'}"
                      + (f", GPU {env['cuda']}" if env.get("cuda") else "") + "."]
    return "\n".join(lines) + "\n"


def write_report(directory: str | Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` and ``report.md`` into ``directory`` atomically."""
    report = dict(report)
    report.setdefault("environment", environment())
    out = Path(directory)
    atomic_write(out / "report.json", json.dumps(report, indent=1, default=str))
    atomic_write(out / "report.md", markdown(report))
