"""``prunekit pareto``: one pruned model per budget, each measured, and the accuracy/cost front.

For every budget (fraction of FLOPs kept) the command prunes the model with ``--method``
(plain criterion pruning without one), fine-tunes it for ``--finetune-epochs`` epochs (a
method that trains does so while pruning instead), and writes ``OUT/budget_B/`` (weights +
plan via :func:`prunekit.persist.write_model`, ``model.onnx`` when onnx and onnxruntime are
installed), then measures its test accuracy, FLOPs, parameters and latency at batch 1 and 16.
``OUT/pareto.json`` holds one record per budget and the unpruned reference; ``pareto.md`` the
table with the Pareto front marked; ``pareto.png`` accuracy against latency and FLOPs.

* ``--method cacp`` searches one conditional policy for all budgets (kept in ``OUT/policy``)
  and queries it per budget.
* Resumable: with ``--resume`` a budget whose record in ``pareto.json`` is finished (done or
  infeasible, with its model directory present) is not redone; the settings must match.
  ``pareto.json`` is rewritten (atomically) after every budget, each model directory is
  written as a whole, so a kill loses at most the budget in progress.
* A budget that cannot be met is recorded as ``infeasible`` with the reason, shown in the table
  and printed as a warning; it is never silently skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.cli.common import (
    DATA_OPTIONS,
    TRAIN_OPTIONS,
    CliError,
    OptionTable,
    accuracy,
    add_model_options,
    add_recipe_options,
    add_trust_code_option,
    add_val_size_option,
    check_in_chans,
    default_device,
    example_shape,
    load_data,
    load_source,
    method_plan,
    method_trains,
    output_dir,
    pct,
    prune_options,
    prune_while_training,
    prune_with_recipe,
    resolve_recipe,
    round_to_arg,
    run_meta,
    train_config,
    training_data,
    training_dir,
)

__all__ = ["pareto_front", "parse_budgets", "PARETO_JSON", "PARETO_MD", "PARETO_PNG", "POLICY_DIR"]

PARETO_JSON, PARETO_MD, PARETO_PNG, POLICY_DIR = "pareto.json", "pareto.md", "pareto.png", "policy"
BATCHES = (1, 16)
"""Batch sizes the latency is measured at."""
# What a resumed run must share with the run it continues (the budgets may differ).
_SETTINGS = ("model", "data", "method", "finetune_epochs", "val_size", "input_shape", "episodes", "seed", "ignore")


def parse_budgets(text: str) -> list[float]:
    """``--budgets`` (comma-separated fractions of FLOPs kept, e.g. ``0.3,0.5,0.7``) as a
    sorted list without repeats; anything else is a :class:`CliError`."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--budgets {text!r}: expected comma-separated fractions, e.g. 0.3,0.5,0.7") from None
    if not values or any(not 0.0 < v <= 1.0 or math.isnan(v) for v in values):
        raise CliError(f"--budgets {text!r}: every budget must be a fraction of FLOPs kept in (0, 1]")
    return sorted(set(values))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points ``(cost, accuracy)`` that no other point dominates: a
    point is dominated when another costs no more and is no less accurate, and is strictly
    better in one of the two. Equal points do not dominate each other."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = -math.inf  # the best accuracy among strictly cheaper points
    i = 0
    while i < len(order):
        j = i
        cost = points[order[i]][0]
        while j < len(order) and points[order[j]][0] == cost:
            j += 1
        top = points[order[i]][1]  # the best accuracy at this cost (sorted first)
        if top > best:
            front.extend(k for k in order[i:j] if points[k][1] == top)
            best = top
        i = j
    return sorted(front)


def budget_dir(budget: float) -> str:
    """The model directory of a budget inside ``--out``."""
    return f"budget_{budget:g}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _same(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) < 1e-9


class _Run:
    """One ``pareto`` invocation: the resolved recipe, the source model, the data and the state
    that ``pareto.json`` holds."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from prunekit.zoo import make_loader

        self.args = args
        self.budgets = parse_budgets(args.budgets)
        if args.episodes is not None and args.episodes < 1:
            raise CliError(f"--episodes {args.episodes}: must be >= 1")
        if not args.latency_time > 0:
            raise CliError(f"--latency-time {args.latency_time}: must be > 0")
        self.r = resolve_recipe(args)
        self.method = self.r.method
        self.trains = method_trains(self.method)  # an unknown method is a CliError here
        self.label = self.method or f"criterion:{self.r.criterion}"
        src = load_source(self.r, args)
        self.src = src
        test_info = load_data(self.r, "test")
        check_in_chans(self.r, test_info, src.plan, f"saved in --model {self.r.model}" if src.plan is not None
                       else "from --in-chans")
        self.test_loader = make_loader(test_info, batch_size=self.r.eval_batch_size, shuffle=False, seed=self.r.seed,
                                       num_workers=self.r.workers)
        self.shape = tuple(example_shape(self.r, src.model, src.spec, src.plan, test_info))
        self.x = torch.randn(*self.shape)
        self.device = default_device()
        self._data: tuple[Any, Any, Any] | None = None
        self._policy: Any = None
        self.policy_note: dict[str, Any] = {}

    # -- state -----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share."""
        return {"model": self.src.spec, "data": self.r.data, "method": self.label,
                "finetune_epochs": self.r.finetune_epochs, "method_trains": self.trains and self.method != "cacp",
                "val_size": int(self.args.val_size or 0), "input_shape": list(self.shape),
                "episodes": self.args.episodes if self.method == "cacp" else None, "seed": self.r.seed,
                "ignore": list(self.r.ignore)}

    def data(self) -> tuple[Any, Any, Any]:
        """Training loader, validation loader (``--val-size``) and training info, loaded once."""
        if self._data is None:
            self._data = training_data(self.r, self.args, self.src.plan)
        return self._data

    # -- pruning ---------------------------------------------------------------------------
    def policy(self, out: Path) -> Any:
        """The cacp policy for all budgets: loaded from ``OUT/policy`` on ``--resume``, else
        searched once (largest budget as the method's target, all budgets as its targets) and
        saved there."""
        if self._policy is not None:
            return self._policy
        from prunekit import methods
        from prunekit.methods.cacp import POLICY_JSON, CACPPolicy

        loader, val_loader, _ = self.data()
        model = self.src.model.to(self.device).eval()
        x = self.x.to(self.device)
        where = out / POLICY_DIR
        if self.args.resume and (where / POLICY_JSON).is_file():
            self._policy = CACPPolicy.load(where, model, x, loader=loader, val_loader=val_loader)
            self.policy_note = {"dir": POLICY_DIR, "searched_in_this_run": False,
                                "episodes": len(self._policy.history)}
            return self._policy
        options: dict[str, Any] = {"targets": tuple(self.budgets), "batches": self.r.calib_batches}
        if self.args.episodes is not None:
            options["episodes"] = self.args.episodes
        if val_loader is not None:
            options["val_batches"] = max(1, len(val_loader))
        cfg = prune_options(dataclasses.replace(self.r, target_flops=None, target_params=None, target_latency=None))
        t0 = time.perf_counter()
        res = methods.get("cacp")(model, x, loader=loader, val_loader=val_loader, target_flops=self.budgets[-1],
                                  config=cfg, epochs=0, progress=not self.args.no_progress, **options)
        self._policy = res.info["policy"]
        self._policy.save(where)
        self.policy_note = {"dir": POLICY_DIR, "searched_in_this_run": True, "episodes": len(self._policy.history),
                            "search_seconds": time.perf_counter() - t0,
                            "dropped_targets": res.info.get("dropped_targets", [])}
        return self._policy

    def prune(self, budget: float, out: Path) -> tuple[Any, Any, dict[str, Any], bool]:
        """``(pruned model, plan, method info, trained)`` at ``budget``; ``trained`` says the
        method trained the network itself (no separate fine-tune). An unreachable budget raises
        ``_Infeasible``."""
        from prunekit.errors import PruningError

        r_b = dataclasses.replace(self.r, target_flops=budget, target_params=None, target_latency=None)
        try:
            if self.method == "cacp":
                _, res = self.policy(out).query(budget)
                info = {k: v for k, v in res.info.items() if k != "policy"}
                return res.model, method_plan(res, r_b), info, False
            if self.trains:
                ns = argparse.Namespace(**{**vars(self.args), "out": str(out / budget_dir(budget)), "resume": False})
                small, plan, info, _ = prune_while_training(self.src.model, r_b, ns, self.src.spec, self.src.plan)
                return small, plan, info, True
            small, plan = prune_with_recipe(self.src.model.eval(), self.x, r_b)
            return small, plan, {}, False
        except (PruningError, CliError) as exc:
            text = str(exc)
            if "cannot be met" in text:
                raise _Infeasible(text) from None
            raise CliError(text) from None

    # -- one budget ------------------------------------------------------------------------
    def measure(self, model: Any) -> dict[str, Any]:
        """Test accuracy, FLOPs, parameters and latency (batch 1 and 16) of ``model``."""
        import torch

        from prunekit.measure import count_flops, count_params, measure_latency

        rec: dict[str, Any] = dict(accuracy(model.to(self.device), self.test_loader))
        model = model.cpu().eval()
        rec["flops"] = int(count_flops(model, self.x))
        rec["params"] = int(count_params(model))
        rec["latency_ms"] = None
        if not self.args.no_latency:
            rec["latency_ms"] = {str(b): measure_latency(model, torch.randn(b, *self.shape[1:]), threads=self.args.threads,
                                                         min_run_time=self.args.latency_time).median_ms
                                 for b in BATCHES}
        return rec

    def one_budget(self, budget: float, out: Path, reference: dict[str, Any]) -> dict[str, Any]:
        """Prune, fine-tune, save and measure one budget; returns its record."""
        import shutil

        from prunekit.persist import write_model
        from prunekit.recover import train
        from prunekit.runtime import atomic_directory

        t0 = time.perf_counter()
        rec: dict[str, Any] = {"budget": budget, "dir": budget_dir(budget)}
        try:
            small, plan, info, trained = self.prune(budget, out)
        except _Infeasible as exc:
            return {**rec, "status": "infeasible", "reason": str(exc), "finished_at": _now()}
        rec["prune_seconds"] = time.perf_counter() - t0
        if not trained and self.r.finetune_epochs > 0:
            loader, _, _ = self.data()
            t1 = time.perf_counter()
            result = train(small.to(self.device), loader, train_config(self.r, finetune=True),
                           progress=not self.args.no_progress)
            rec["finetune"] = {"epochs": result.epochs_completed, "seconds": time.perf_counter() - t1}
        rec.update(self.measure(small))
        rec["flops_kept"] = rec["flops"] / reference["flops"]
        rec["params_kept"] = rec["params"] / reference["params"]
        with atomic_directory(out / budget_dir(budget)) as tmp:  # weights, plan and ONNX appear together
            write_model(small, plan, tmp, model_spec=self.src.spec,
                        extra=run_meta(self.shape, self.src.num_classes, self.src.in_chans))
            rec["onnx"] = self.export(small, tmp)
        if self.trains:  # the method's checkpoints are done with once the model is written
            shutil.rmtree(training_dir(str(out / budget_dir(budget))), ignore_errors=True)
        rec["method_info"] = json.loads(json.dumps(info, default=str)) if info else {}
        rec.update(status="done", seconds=time.perf_counter() - t0, finished_at=_now())
        return rec

    def export(self, model: Any, where: Path) -> str:
        """``model.onnx`` in ``where`` when onnx/onnxruntime are importable; what happened, as text."""
        if self.args.no_onnx:
            return "skipped (--no-onnx)"
        import importlib.util

        if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
            return "skipped (onnx / onnxruntime not installed)"
        from prunekit.export import export_onnx

        try:
            export_onnx(model.cpu().eval(), self.x, where / "model.onnx")
        except Exception as exc:  # noqa: BLE001 - an export failure is reported in the table, not fatal
            return f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        return "model.onnx"


class _Infeasible(Exception):
    """A budget the method cannot reach (its message says why)."""


def _read_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CliError(f"--resume: {path} is not readable JSON ({exc})") from None


def _finished(state: dict[str, Any], budget: float, out: Path) -> dict[str, Any] | None:
    """The finished record of ``budget`` in ``state`` (done with its model present, or infeasible)."""
    for rec in state.get("records", []):
        if _same(rec["budget"], budget):
            if rec.get("status") == "infeasible":
                return rec
            if rec.get("status") == "done" and (out / rec["dir"] / "plan.json").is_file():
                return rec
    return None


def _with_fronts(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every measured point's membership of the latency and FLOPs fronts."""
    points = [state["reference"]] + [r for r in state["records"] if r.get("status") == "done"]
    for p in points:
        p["front_latency"] = p["front_flops"] = False
    lat = [p for p in points if p.get("latency_ms")]
    for i in pareto_front([(p["latency_ms"]["1"], p["top1"]) for p in lat]):
        lat[i]["front_latency"] = True
    for i in pareto_front([(float(p["flops"]), p["top1"]) for p in points]):
        points[i]["front_flops"] = True
    state["front"] = {"latency": [p.get("budget", 1.0) for p in points if p["front_latency"]],
                      "flops": [p.get("budget", 1.0) for p in points if p["front_flops"]]}
    return state


def _markdown(state: dict[str, Any]) -> str:
    """``pareto.md``: settings, the table (reference first), the unreachable budgets and the plot."""
    def ms(p: dict[str, Any], b: int) -> str:
        return f"{p['latency_ms'][str(b)]:.3f}" if p.get("latency_ms") else "-"

    def yes(v: Any) -> str:
        return "yes" if v else ""

    lines = [f"# prunekit pareto: `{state['method']}` on `{state['model']}`, data `{state['data']}`", "",
             f"Fine-tune epochs per budget: {state['finetune_epochs']}"
             + (" (the method's own training while it prunes)" if state.get("method_trains") else "")
             + f"; validation images held out: "
             f"{state['val_size']}; input {state['input_shape']}"
             + (f"; cacp policy: {state['policy']}" if state.get("policy") else "") + ".", "",
             "| budget (FLOPs kept) | status | FLOPs kept | params kept | top-1 | top-5 | latency b=1 (ms) "
             "| latency b=16 (ms) | front (latency) | front (FLOPs) | ONNX | model |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = state["reference"]
    lines.append(f"| original | reference | 1.000 | 1.000 | {pct(ref['top1'])} | {pct(ref['top5'])} | {ms(ref, 1)} "
                 f"| {ms(ref, 16)} | {yes(ref.get('front_latency'))} | {yes(ref.get('front_flops'))} | | |")
    for rec in state["records"]:
        if rec.get("status") != "done":
            lines.append(f"| {rec['budget']:g} | **{rec.get('status')}** | | | | | | | | | | {rec.get('reason', '')} |")
            continue
        lines.append(f"| {rec['budget']:g} | done | {rec['flops_kept']:.3f} | {rec['params_kept']:.3f} | "
                     f"{pct(rec['top1'])} | {pct(rec['top5'])} | {ms(rec, 1)} | {ms(rec, 16)} | "
                     f"{yes(rec.get('front_latency'))} | {yes(rec.get('front_flops'))} | {rec.get('onnx', '')} | "
                     f"`{rec['dir']}/` |")
    bad = [r for r in state["records"] if r.get("status") == "infeasible"]
    if bad:
        lines += ["", "Budgets that cannot be met:"] + [f"* {r['budget']:g}: {r['reason']}" for r in bad]
    lines += ["", "A model is on a front when no other model is at least as accurate for no more latency "
              "(batch 1) / FLOPs and better in one of them.", "", f"![accuracy against latency and FLOPs]({PARETO_PNG})",
              ""]
    return "\n".join(lines)


def _write(out: Path, state: dict[str, Any], *, plot: bool = True) -> None:
    """Write ``pareto.json``, ``pareto.md`` and (with ``plot``) ``pareto.png`` atomically (each file)."""
    from prunekit.persist import atomic_write
    from prunekit.plot import plot_pareto

    state = _with_fronts(state)
    atomic_write(out / PARETO_JSON, json.dumps(state, indent=1, default=str))
    atomic_write(out / PARETO_MD, _markdown(state))
    if not plot:
        return
    points = [{**state["reference"], "label": "original", "reference": True}]
    points += [{**r, "label": f"{r['budget']:g}"} for r in state["records"] if r.get("status") == "done"]
    for p in points:
        p["latency_ms"] = p["latency_ms"]["1"] if p.get("latency_ms") else None
    plot_pareto(points, out / PARETO_PNG, title=state["method"])


def run(args: argparse.Namespace) -> int:
    """``prunekit pareto``: see the module docstring."""
    from prunekit.report import environment

    run_ = _Run(args)
    out = output_dir(args.out)
    settings = run_.settings()
    previous = _read_state(out / PARETO_JSON) if args.resume else None
    if previous is not None:
        changed = [k for k in _SETTINGS if previous.get(k) != settings[k]]
        if changed:
            raise CliError(f"--resume: {out / PARETO_JSON} was written with other settings ("
                           + ", ".join(f"{k}: {previous.get(k)!r} there, {settings[k]!r} now" for k in changed) + ")")
    state: dict[str, Any] = previous or {"command": "pareto", **settings, "records": [], "environment": environment()}
    if "reference" not in state:
        state["reference"] = {"budget": 1.0, **run_.measure(run_.src.model)}
    kept = {rec["budget"]: rec for rec in state["records"]}
    todo = []
    for b in run_.budgets:
        rec = _finished(state, b, out)
        if rec is None:
            todo.append(b)
        else:
            kept[rec["budget"]] = rec
    state["records"] = sorted(kept.values(), key=lambda rec: rec["budget"])
    state["budgets"] = sorted({*state.get("budgets", []), *run_.budgets})
    print(f"prunekit pareto: {run_.label} on {run_.src.spec}, budgets {', '.join(f'{b:g}' for b in run_.budgets)}"
          + (f" ({len(run_.budgets) - len(todo)} finished before, not redone)" if len(todo) < len(run_.budgets) else ""))
    for b in todo:
        rec = run_.one_budget(b, out, state["reference"])
        if run_.policy_note:
            state["policy"] = run_.policy_note
        kept[b] = rec
        state["records"] = sorted(kept.values(), key=lambda r: r["budget"])
        _write(out, state, plot=False)  # after every budget: a kill loses only the budget in progress
        if rec["status"] == "infeasible":
            print(f"prunekit pareto: warning: budget {b:g} cannot be met: {rec['reason']}", file=sys.stderr)
        else:
            lat = rec["latency_ms"]["1"] if rec.get("latency_ms") else None
            print(f"  budget {b:g}: FLOPs kept {rec['flops_kept']:.3f}, top-1 {pct(rec['top1'])}"
                  + (f", {lat:.3f} ms at batch 1" if lat is not None else "") + f"; saved {out / rec['dir']}/")
    _write(out, state)
    for rec in state["records"]:
        if rec.get("status") == "infeasible" and rec["budget"] not in todo:
            print(f"prunekit pareto: warning: budget {rec['budget']:g} cannot be met: {rec['reason']}", file=sys.stderr)
    print(f"wrote {out / PARETO_MD}, {out / PARETO_JSON}, {out / PARETO_PNG}")
    return 0


PARETO_OPTIONS: OptionTable = [
    ("--method", "method", str, "pruning method for every budget (default: plain criterion pruning): cacp (one "
     "conditional policy searched once, queried per budget), cap, channel_pruning, criterion:NAME, or a method "
     "that trains (slimming, scp, dais, ...: its training replaces the fine-tune)"),
    ("--data", "data", str, "data set: the test split measures accuracy, the training split calibrates and "
     "fine-tunes (digits, cifar10:PATH, fashion-mnist:PATH, ...)"),
    ("--criterion", "criterion", str, "channel criterion of plain pruning (default l2)"),
    ("--calib-batches", "calib_batches", int, "calibration batches (training split) of data-driven methods; "
     "cacp: its BN re-calibration batches"),
    ("--min-channels", "min_channels", int, "every group keeps at least this many channels"),
    ("--round-to", "round_to", round_to_arg, "keep channel counts multiples of this, or auto (chosen by timing)"),
    ("--finetune-epochs", "finetune_epochs", int, "fine-tuning epochs of every pruned model (a method that trains: "
     "its training epochs)"),
    ("--finetune-lr", "finetune_lr", float, "peak learning rate of the fine-tuning")]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pareto`` on the CLI's sub-parser set."""
    p = sub.add_parser("pareto", help="one pruned model per FLOPs budget, measured, with the accuracy/cost front",
                       description="Prune the model at every budget (fraction of FLOPs kept), fine-tune, save and "
                       "measure each (test accuracy, FLOPs, params, latency at batch 1 and 16, ONNX), and write "
                       "pareto.md, pareto.json and pareto.png with the Pareto front marked. Resumable.")
    add_model_options(p, model_required=False)
    p.add_argument("--recipe", default=None, help="YAML recipe file or packaged recipe name; flags override it")
    p.add_argument("--budgets", required=True, help="comma-separated fractions of FLOPs kept, e.g. 0.3,0.5,0.7")
    p.add_argument("--ignore", nargs="*", default=None, help="module names whose output channels must stay")
    p.add_argument("--out", required=True, help="output directory: budget_B/ per budget, pareto.md/.json/.png")
    p.add_argument("--episodes", type=int, default=None, help="cacp: search episodes of the policy (default 200)")
    add_recipe_options(p, PARETO_OPTIONS + [o for o in TRAIN_OPTIONS if o[1] not in ("epochs", "lr")]
                       + [o for o in DATA_OPTIONS if o[1] in ("image_size", "subset", "workers", "eval_batch_size")])
    add_val_size_option(p, "; the methods' validation data (cacp: its reward)")
    p.add_argument("--resume", action="store_true", help="keep the budgets pareto.json records as finished (and "
                   "a saved cacp policy); only the others are run")
    p.add_argument("--latency-time", type=float, default=0.5,
                   help="seconds of timed calls per latency measurement (default 0.5)")
    p.add_argument("--no-onnx", action="store_true", help="do not export ONNX (recorded as skipped)")
    p.add_argument("--no-progress", action="store_true", help="hide progress output")
    add_trust_code_option(p)
    p.set_defaults(func=run)
