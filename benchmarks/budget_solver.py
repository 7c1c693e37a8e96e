"""Budget solver: cost model vs pruning and measuring every candidate, in the same process.

``pk.prune(model, x, target_flops=T)`` bisects over removals; each candidate is evaluated
either on the differentiable cost model (``prunekit.allocate.cost``, the default) or, as
before it existed, by pruning the candidate and counting its FLOPs (what the solver falls
back to for a model the cost model cannot describe). Both paths must give the same plan.

    python benchmarks/budget_solver.py                       # resnet50, mobilenet_v2, vit_b_16 at 0.5
    python benchmarks/budget_solver.py --models resnet50 --targets 0.3,0.5 --repeats 3

Writes ``results/budget_solver.json`` and ``.md`` (machine noted). Times are wall seconds of
the whole ``pk.prune`` call with a ready graph (scoring, solving, pruning, validation), best
of ``--repeats``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torchvision

import prunekit as pk
import prunekit.api as api
from common import RESULTS_DIR, machine_info, machine_line, md_table, write_json


class _NoCostModel:
    """Stand-in that makes the solver fall back to pruning and measuring each candidate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cost model disabled for the comparison")


def _time(model: torch.nn.Module, x: torch.Tensor, graph: Any, target: float, repeats: int) -> tuple[float, Any]:
    best, plan = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        _, plan = pk.prune(model, x, target_flops=target, graph=graph, return_plan=True)
        best = min(best, time.perf_counter() - t)
    return best, plan


def main() -> None:
    """Run the comparison and write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16")
    p.add_argument("--targets", default="0.5")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, 224, 224)
        graph = pk.trace(model, x)
        for target in (float(t) for t in args.targets.split(",")):
            fast, plan_fast = _time(model, x, graph, target, args.repeats)
            real = api.CostModel
            api.CostModel = _NoCostModel  # type: ignore[misc, assignment]
            try:
                slow, plan_slow = _time(model, x, graph, target, args.repeats)
            finally:
                api.CostModel = real  # type: ignore[misc]
            rows.append({"model": name, "target_flops": target, "cost_model_s": fast, "prune_and_measure_s": slow,
                         "speedup": slow / fast, "flops_kept": plan_fast.meta["flops_kept"],
                         "same_plan": plan_fast.steps == plan_slow.steps})
            print(rows[-1], flush=True)
    info = machine_info()
    write_json(RESULTS_DIR / "budget_solver.json", {"machine": info, "rows": rows})
    table = md_table(["model", "target FLOPs", "cost model s", "prune+measure s", "speed-up", "FLOPs kept", "same plan"],
                     [[r["model"], r["target_flops"], r["cost_model_s"], r["prune_and_measure_s"], r["speedup"],
                       r["flops_kept"], r["same_plan"]] for r in rows])
    text = (f"# Budget solver: cost model vs prune-and-measure per candidate\n\n{machine_line(info)}\n\n"
            f"`pk.prune(model, x, target_flops=T, graph=g)` wall time, best of {args.repeats}, {args.threads} torch "
            f"thread(s), batch 1, 224x224, random init.\n\n{table}\n")
    (RESULTS_DIR / "budget_solver.md").write_text(text)


if __name__ == "__main__":
    main()
