"""Helpers shared by the benchmark scripts: machine description, JSON/Markdown output."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """Describe the machine and software the numbers come from."""
    info: dict[str, Any] = {
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    for mod in ("torchvision", "timm", "torch_pruning", "prunekit"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is just not reported
            pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One Markdown line summarising :func:`machine_info`."""
    cores = info.get("usable_cores", info.get("cpu_count"))
    parts = [f"processor `{info.get('processor')}`", f"{cores} cores", f"torch {info.get('torch')}"]
    for mod in ("torchvision", "timm", "torch_pruning", "prunekit"):
        if mod in info:
            parts.append(f"{mod} {info[mod]}")
    parts.append(f"date {info.get('date')}")
    return "Machine: " + ", ".join(parts)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (write a temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)


def read_json(path: Path, default: Any) -> Any:
    """Read JSON from ``path``; ``default`` when the file is absent."""
    if not path.exists():
        return default
    return json.loads(path.read_text())


def md_cell(value: Any) -> str:
    """Format one Markdown table cell (floats to 3 significant digits, pipes escaped)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.2e}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Render a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
