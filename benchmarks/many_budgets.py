"""Many budgets from one run: CACP and OFA against independent runs per budget (issue 13).

From the trained ResNet-20 of each data set (``benchmarks/baselines/``, ``prunekit.load(DIR)``),
five FLOPs budgets (fraction kept 0.3, 0.4, 0.5, 0.6, 0.7) come from

* ONE ``cacp`` search per (data set, seed): the conditional policy
  (``methods.get("cacp")(..., targets=...)``, ``res.info["policy"]``) queried per budget
  (``policy.query(c)``: per-group ratios, L2-ranked channels, BN re-calibrated on the
  calibration batches), no new search;
* ONE ``ofa`` run per (data set, seed): the once-for-all cohort (``methods.get("ofa")(...,
  rates=budgets, resolutions=())``, resolution 1.0 only), each member taken out with
  ``cohort.extract(flops=c, calibration=...)`` (BN statistics re-estimated on the calibration
  batches);

against five independent ``cap`` runs (compensation-aware pruning) and five independent
``criterion:l2`` runs (plain L2 removal), one per budget, and, as CACP's own control (the paper
against AMC), five ``cacp:single`` runs: the same agent unconditioned (``conditional=False``)
searched on each budget alone with a fifth of the conditional run's episodes, so the five spend
what the one does; and, OFA's control, five ``cap+time`` runs: ``cap`` with the shared
fine-tune lengthened by a fifth of the OFA run's seconds (OFA trains its cohort before the
fine-tune, so at equal compute the independent runs get that time as training). Every model is
evaluated on the full test split without fine-tuning, then fine-tuned with the one brief
schedule every row shares, and evaluated again::

    python benchmarks/many_budgets.py                                # both data sets, seeds 0-2
    python benchmarks/many_budgets.py --datasets cifar10-partial --methods cacp,cap --seeds 0
    python benchmarks/many_budgets.py --max-steps 2 --seeds 0 --datasets cifar10-partial \\
        --cacp-episodes 4 --ofa-epochs 2 --ofa-search-epochs 1 --results /tmp/mb/many_budgets.json \\
        --runs-dir /tmp/mb/runs                                      # smoke test
    python benchmarks/many_budgets.py --report-only                  # rebuild the Markdown and the plot
    nohup python benchmarks/many_budgets.py > runs/many_budgets.log 2>&1 &   # the full table, resumable

Protocol: ``benchmarks/methods.py``'s (imported from it): splits (validation held out of the
training files), calibration batches drawn per seed, the shared fine-tune (SGD momentum 0.9,
cosine from the LR to 0, weight decay 5e-4, batch 128, augmentation), FLOPs counted by
``count_flops`` for every row, seeds outermost, 95% t-intervals, resumable results JSON
(``results/many_budgets.{json,md,png}``). Fine-tune LR: ``--ft-lr``, else tuned here on
validation (``methods.py``'s grid, after plain L2 removal at 50% FLOPs, with this script's brief
fine-tune), or with ``--lr-from results/methods.json`` the one ``methods.py`` tuned for its
longer fine-tune.

Search runs are cached: each finished cacp policy / ofa cohort is saved under
``--runs-dir/<data set>/seed<k>/<method>/`` (``runs/`` is git-ignored) with a ``search.json``
holding its wall seconds and settings, and its record is copied into the results JSON
(``searches``). The five budget rows of a run reuse it, a resumed benchmark loads it instead of
searching again (a saved run with other settings is searched again), and its compute is
counted once. OFA's training also checkpoints every epoch (``.../ofa/train``), so a kill
mid-training resumes there.

Compute: *search s* is the one run's wall time (cacp: the search and the method's own query;
ofa: structure search and joint training, every epoch's seconds summed over resumes), *query
s* the per-budget ``query`` / ``extract`` time (the row's prune seconds), *prune s* of an
independent row its pruning time. The issue's target, judged on these seconds (the shared
fine-tunes are the same per model on both sides and are left out; the totals with them are
reported too): all five budgets from the one run (search + five queries) at most 1.5x the
compute of one independent run (the mean over the budgets of a ``cap`` run's prune seconds),
and each budget's fine-tuned accuracy within 0.3 points of (or above) its independent
counterpart (mean over seeds of the paired per-seed gap; against ``cap`` and against
``criterion:l2``).

Sizing (measured 2026-12-02, two shards of one thread, one data set each): the shared fine-tune
is brief, 80 steps of one Fashion-MNIST epoch (``--ft-steps-per-epoch fashion-mnist=80``, ~10k
images) and 2 epochs of the CIFAR-10 images (74 steps); cacp searches 150 episodes (37 random
warm-up; the method's default is 200) over the targets {0.3, 0.5, 0.7} (CACP's set: 0.4 and 0.6
are interpolated by the conditioned policy), ~1.2 s an episode (BN re-calibration on the 8
calibration batches, the reward on 4 validation batches); ofa trains 4 epochs of at most 50
steps (Fashion-MNIST; all 37 of CIFAR-10), structure search capped at 2 of them, then sandwich
joint training with the method's 2 random members besides the largest and the smallest. About
25 minutes per seed and data set for the 20 main rows and ~1.5 minutes per control row: ~2 h 20
min of both cores for 3 seeds x 30 rows x 2 data sets. Every number is an option.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from prunekit import methods as pk_methods  # noqa: E402
from prunekit.cli.pareto import pareto_front  # noqa: E402
from prunekit.methods.cacp import CACPPolicy  # noqa: E402
from prunekit.methods.ofa_cohort import OFACohort  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods as mb  # noqa: E402  (benchmarks/methods.py: data, context, fine-tune, grid, intervals)
from common import RESULTS_DIR, machine_line, md_table, write_json  # noqa: E402

log = logging.getLogger("many_budgets")
REPO = Path(__file__).resolve().parent.parent
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7)
ONE_RUN = ("cacp", "ofa")  # one search run serves every budget
INDEPENDENT = ("cap", "criterion:l2")  # one run per budget
# CACP's own control: the same agent trained on one target alone (AMC), a fifth of the conditional
# run's episodes per budget, so the five cost what the one conditional run does.
PER_TARGET = "cacp:single"
# OFA trains its cohort before the shared fine-tune; this is cap given that training time: its
# fine-tune lengthened by a fifth of the OFA run's seconds (per budget, equal compute).
CAP_TIME = "cap+time"
METHODS = ONE_RUN + INDEPENDENT + (PER_TARGET, CAP_TIME)
GAP_PAIRS = [(m, r) for m in ONE_RUN for r in INDEPENDENT] + [("cacp", PER_TARGET), ("ofa", CAP_TIME)]
DEFAULT_FT_EPOCHS = "fashion-mnist=1,cifar10-partial=2"
DEFAULT_FT_STEPS = "fashion-mnist=80"
TARGET_RATIO = 1.5  # the compute target: at most 1.5x one independent run
TARGET_GAP = 0.003  # ... and each budget within 0.3 points of its independent counterpart
TITLE = "Many budgets from one run: CACP and OFA against independent runs, trained ResNet-20"

# Search runs of this process: (data set, seed, method) -> the CACPPolicy / OFACohort.
_STORE: dict[tuple[str, int, str], Any] = {}


def row_name(method: str, budget: float) -> str:
    """``cacp@0.3``: the row of ``method`` at ``budget`` (fraction of FLOPs kept)."""
    return f"{method}@{budget:g}"


def split_row(row: str) -> tuple[str, float]:
    """Inverse of :func:`row_name`."""
    method, _, budget = row.rpartition("@")
    return method, float(budget)


def at_budget(ctx: mb.Ctx, budget: float) -> mb.Ctx:
    """``ctx`` with the FLOPs target set to ``budget`` (the rows of ``methods.py`` read it there)."""
    return dataclasses.replace(ctx, args=argparse.Namespace(**{**vars(ctx.args), "target_flops": budget}))


def stored(ctx: mb.Ctx, method: str) -> Any:
    """The search run of ``method`` for this row's data set and seed (made by :func:`ensure_search`)."""
    key = (ctx.data.name, ctx.seed, method)
    if key not in _STORE:
        raise RuntimeError(f"no {method} run for {ctx.data.name} seed {ctx.seed} (its search failed: see 'searches')")
    return _STORE[key]


def row_cacp(budget: float) -> mb.Row:
    """The cached CACP policy queried at ``budget`` (BN re-calibrated, as during its search)."""
    def run(ctx: mb.Ctx) -> tuple[nn.Module, dict[str, Any]]:
        policy = stored(ctx, "cacp")
        _, res = policy.query(budget)
        info = {k: res.info[k] for k in ("target_grid", "band", "flops_kept", "measured_flops", "in_training_range",
                                         "recovered")}
        return res.model, {**info, "trained_target": any(abs(budget - c) < 1e-9 for c in policy.opts.targets),
                           "keep": res.info["keep"], "search_settings": search_settings("cacp", ctx.data.name, ctx.args)}
    return run


def row_ofa(budget: float) -> mb.Row:
    """The cached OFA cohort's member of ``budget`` at the reference resolution, BN statistics
    re-estimated on the calibration batches."""
    def run(ctx: mb.Ctx) -> tuple[nn.Module, dict[str, Any]]:
        res = stored(ctx, "ofa").extract(budget, calibration=ctx.calib)
        return res.model, {**{k: res.info[k] for k in ("flops_fraction", "bn_recalibrated")},
                           "search_settings": search_settings("ofa", ctx.data.name, ctx.args)}
    return run


def row_cacp_single(budget: float) -> mb.Row:
    """An unconditioned CACP agent (``conditional=False``, AMC's setting) searched on ``budget``
    alone for ``--cacp-episodes`` / 5 episodes: five of them spend the conditional run's episodes."""
    def run(ctx: mb.Ctx) -> tuple[nn.Module, dict[str, Any]]:
        episodes = single_episodes(ctx.args.cacp_episodes)
        res = pk_methods.get("cacp")(ctx.base, ctx.data.x, loader=ctx.calib, val_loader=ctx.data.val,
                                     target_flops=budget, ignore=[mb.CLASSIFIER], episodes=episodes,
                                     conditional=False, batches=len(ctx.calib), seed=ctx.seed)
        return res.model, {**{k: res.info[k] for k in ("episodes", "warmup", "search_seconds", "best_reward",
                                                         "flops_kept", "measured_flops")},
                           "keep": res.info["keep"]}
    return run


def single_episodes(cacp_episodes: int) -> int:
    """Episodes of one ``cacp:single`` search: the conditional run's ``cacp_episodes``, shared out
    over the budgets."""
    return max(1, cacp_episodes // len(BUDGETS))


def row_independent(row: mb.Row, budget: float) -> mb.Row:
    """A ``methods.py`` row (``cap``, plain L2) run on its own to ``budget``."""
    def run(ctx: mb.Ctx) -> tuple[nn.Module, dict[str, Any]]:
        return row(at_budget(ctx, budget))
    return run


def cap_time_steps(budget: float) -> mb.StepsRule:
    """``cap+time@budget``'s fine-tune: the shared steps plus a fifth of this seed's OFA run's
    seconds, converted at the fine-tune speed of this seed's ``cap@budget`` (the same model)."""
    def rule(ctx: mb.Ctx, results: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ds = ctx.data.name
        cap = results["runs"].get(f"{ds}/{row_name('cap', budget)}/{ctx.seed}", {})
        ofa_s = _search_s(results, ds, "ofa", ctx.seed)
        if cap.get("status") != "ok" or ofa_s is None:
            raise RuntimeError(f"{CAP_TIME} needs this seed's cap@{budget:g} row and ofa run first")
        extra = ofa_s / len(BUDGETS)
        steps = ctx.ft_steps + int(round(extra / (cap["finetune_s"] / cap["ft_steps"])))
        return steps, {"extra_s_matched": extra, "ofa_search_s": ofa_s}
    return rule


LONGER = {**mb.LONGER_FINETUNE, **{row_name(CAP_TIME, b): cap_time_steps(b) for b in BUDGETS}}

MAKERS: dict[str, Callable[[float], mb.Row]] = {
    "cacp": row_cacp,
    "ofa": row_ofa,
    "cap": lambda b: row_independent(mb.row_method("cap"), b),
    "criterion:l2": lambda b: row_independent(mb.row_criterion("l2"), b),
    PER_TARGET: row_cacp_single,
    CAP_TIME: lambda b: row_independent(mb.row_method("cap"), b),
}
# Budget-major, so a partial table compares the methods at the budgets it has.
ROWS: dict[str, mb.Row] = {row_name(m, b): MAKERS[m](b) for b in BUDGETS for m in METHODS}


# --------------------------------------------------------------------------- search runs


def search_settings(method: str, ds: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a cached search run of ``method`` on ``ds`` must have been made with to be reused."""
    common = {"max_steps": args.max_steps, "calib_batches": args.calib_batches}
    if method == "cacp":
        return {**common, "episodes": args.cacp_episodes, "targets": list(args.cacp_targets)}
    return {**common, "rates": list(BUDGETS), "epochs": args.ofa_epochs, "search_epochs": args.ofa_search_epochs,
            "steps_per_epoch": args.ofa_steps_per_epoch.get(ds), "n_random": args.ofa_random,
            "ft_lr": args.ft_lr[ds]}


def run_cacp(ctx: mb.Ctx, where: Path, args: argparse.Namespace) -> tuple[CACPPolicy, dict[str, Any]]:
    """One conditional CACP search (its policy saved in ``where/cacp_policy`` by the method)."""
    res = pk_methods.get("cacp")(ctx.base, ctx.data.x, loader=ctx.calib, val_loader=ctx.data.val,
                                 target_flops=args.cacp_targets[len(args.cacp_targets) // 2], ignore=[mb.CLASSIFIER],
                                 episodes=args.cacp_episodes, targets=tuple(args.cacp_targets),
                                 batches=len(ctx.calib), seed=ctx.seed, run_dir=where, resume=False)
    info = {k: res.info[k] for k in ("episodes", "warmup", "search_seconds", "best_reward", "trajectory_summary",
                                     "width", "walked_groups", "dropped_targets", "reward_data", "targets")}
    return res.info["policy"], info


def load_cacp(ctx: mb.Ctx, where: Path) -> CACPPolicy:
    """The policy :func:`run_cacp` saved, with this seed's calibration and validation batches."""
    return CACPPolicy.load(where / "cacp_policy", ctx.base, ctx.data.x, loader=ctx.calib, val_loader=ctx.data.val)


def ofa_config(ctx: mb.Ctx, args: argparse.Namespace) -> Any:
    """OFA's training schedule: the shared fine-tune's (tuned LR, cosine) over OFA's epochs and step cap."""
    caps = [c for c in (args.ofa_steps_per_epoch.get(ctx.data.name), args.max_steps) if c]
    return dataclasses.replace(mb.finetune_config(ctx), epochs=args.ofa_epochs,
                               max_steps_per_epoch=min(caps) if caps else None)


def run_ofa(ctx: mb.Ctx, where: Path, args: argparse.Namespace) -> tuple[OFACohort, dict[str, Any]]:
    """One OFA run over the five budgets at the reference resolution (checkpointed in
    ``where/train``; the cohort saved in ``where/cohort``)."""
    res = pk_methods.get("ofa")(ctx.base, ctx.data.x, loader=ctx.data.train_loader(ctx.seed + 500),
                                epochs=args.ofa_epochs, train_config=ofa_config(ctx, args), target_flops=0.5,
                                rates=BUDGETS, resolutions=(), ignore=[mb.CLASSIFIER],
                                search_epochs=args.ofa_search_epochs, n_random=args.ofa_random, bn_batches=0,
                                seed=ctx.seed, run_dir=where / "train", resume=True)
    cohort = res.info["cohort"]
    cohort.save(where / "cohort")
    train = res.info["train"]
    history = train["history"]
    info = {"search": {k: v for k, v in res.info["search"].items() if k != "history"},
            "members": [{k: m[k] for k in ("name", "rate", "flops_fraction", "params")} for m in res.info["members"]],
            "skipped": res.info["skipped"], "ungated_groups": res.info["ungated_groups"],
            "epochs": train["epochs"], "steps": history[-1]["step"] if history else 0,
            "resumed_from_epoch": train["resumed_from_epoch"],
            "epoch_seconds": [h["seconds"] for h in history]}
    return cohort, info


def load_ofa(ctx: mb.Ctx, where: Path) -> OFACohort:
    """The cohort :func:`run_ofa` saved, over a copy of the baseline's architecture."""
    return OFACohort.load(where / "cohort", model=copy.deepcopy(ctx.base))


def ensure_search(method: str, ctx: mb.Ctx, args: argparse.Namespace, results: dict[str, Any],
                  results_path: Path) -> None:
    """Load or make the search run of ``method`` for ``ctx``'s data set and seed into
    :data:`_STORE`, its record (seconds, settings, what it learned) in ``results['searches']``.
    A run is reused when its ``search.json`` is there with the same settings; a failing search
    is recorded (its rows then fail)."""
    ds, seed = ctx.data.name, ctx.seed
    key = (ds, seed, method)
    if key in _STORE:
        return
    where = Path(args.runs_dir) / ds / f"seed{seed}" / method
    marker = where / "search.json"
    settings = search_settings(method, ds, args)
    record = json.loads(marker.read_text()) if marker.is_file() else None
    try:
        if record is not None and record.get("settings") == settings:
            _STORE[key] = (load_cacp if method == "cacp" else load_ofa)(ctx, where)
            log.info("%s/%s/%d: cached search run loaded (%.0f s when made)", ds, method, seed, record["seconds"])
        else:
            started = where / "settings.json"
            if record is not None or (started.is_file() and json.loads(started.read_text()) != settings):
                shutil.rmtree(where)  # made or begun with other settings: its checkpoints go too
            for stale in ("cacp_policy", "cohort"):  # saved by a run killed before its search.json
                shutil.rmtree(where / stale, ignore_errors=True)
            write_json(started, settings)  # OFA's epoch checkpoints resume only under the same settings
            log.info("%s/%s/%d: searching ...", ds, method, seed)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            obj, info = (run_cacp if method == "cacp" else run_ofa)(ctx, where, args)
            seconds = time.perf_counter() - t0
            if method == "ofa":  # epochs trained before a resume count too
                before = info["resumed_from_epoch"] or 0
                seconds += sum(info["epoch_seconds"][:before])
            record = {"status": "ok", "seconds": seconds, "settings": settings, "info": info,
                      "loadavg_1m": round(os.getloadavg()[0], 2), "finished": mb.finished_stamp()}
            write_json(marker, record)
            _STORE[key] = obj
            log.info("%s/%s/%d: search done in %.0f s", ds, method, seed, seconds)
    except Exception as exc:  # noqa: BLE001 - a failing search is a result too
        log.exception("%s/%s/%d: search failed", ds, method, seed)
        record = {"status": "fail", "error": f"{type(exc).__name__}: {exc}", "settings": settings}
    results.setdefault("searches", {})[f"{ds}/{method}/{seed}"] = record
    write_json(results_path, results)


def drop_superseded(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Move the finished rows of a search run made with other settings than the current ones
    (e.g. another ``--cacp-episodes``; for ``cacp:single`` its share of them) to
    ``results['superseded']``, so that they are redone."""
    for key, rec in list(results["runs"].items()):
        method = split_row(rec["row"])[0]
        if rec["dataset"] not in args.ft_lr or rec["status"] != "ok":
            continue
        info = rec.get("info", {})
        if (method in ONE_RUN and info.get("search_settings") != search_settings(method, rec["dataset"], args)) \
                or (method == PER_TARGET and info.get("episodes") != single_episodes(args.cacp_episodes)):
            results.setdefault("superseded", {})[key] = results["runs"].pop(key)


def pending(results: dict[str, Any], ds: str, row: str, seed: int, args: argparse.Namespace) -> bool:
    """Whether ``run_grid`` will run (data set, row, seed): not finished at the current LR."""
    done = results["runs"].get(f"{ds}/{row}/{seed}", {})
    return not (done.get("status") == "ok" and done.get("ft_lr") == args.ft_lr[ds])


# --------------------------------------------------------------------------- report


def _ok(results: dict[str, Any], ds: str, row: str) -> dict[int, dict[str, Any]]:
    """Seed -> finished run of (``ds``, ``row``) at the data set's current fine-tune LR."""
    lr = results["config"]["ft_lr"].get(ds)
    return {r["seed"]: r for r in results["runs"].values()
            if r["dataset"] == ds and r["row"] == row and r["status"] == "ok" and r.get("ft_lr") == lr}


def _search_s(results: dict[str, Any], ds: str, method: str, seed: int) -> float | None:
    rec = results.get("searches", {}).get(f"{ds}/{method}/{seed}")
    return rec["seconds"] if rec and rec.get("status") == "ok" else None


def compute_table(results: dict[str, Any], ds: str) -> tuple[list[list[Any]], dict[str, dict[str, Any]]]:
    """Per one-run method, over the seeds with all five budgets of it and of ``cap`` done: the
    search seconds, the queries', the one run's total, one and five ``cap`` runs, five plain-L2
    runs, the ratios and the totals with the fine-tunes. Returns (table rows, method -> summary)."""
    rows, summary = [], {}
    indep = {m: {b: _ok(results, ds, row_name(m, b)) for b in BUDGETS} for m in INDEPENDENT}
    for method in ONE_RUN:
        mine = {b: _ok(results, ds, row_name(method, b)) for b in BUDGETS}
        seeds = sorted(s for s in set.intersection(*(set(v) for v in mine.values()), *(set(v) for v in indep["cap"].values()))
                       if _search_s(results, ds, method, s) is not None)
        if not seeds:
            continue
        def mean(f: Callable[[int], float]) -> float:
            return statistics.mean(f(s) for s in seeds)

        search = mean(lambda s: _search_s(results, ds, method, s))
        query = mean(lambda s: sum(mine[b][s]["prune_s"] for b in BUDGETS))
        cap5 = mean(lambda s: sum(indep["cap"][b][s]["prune_s"] for b in BUDGETS))
        l2_seeds = [s for s in seeds if all(s in indep["criterion:l2"][b] for b in BUDGETS)]
        l25 = statistics.mean(sum(indep["criterion:l2"][b][s]["prune_s"] for b in BUDGETS) for s in l2_seeds) \
            if l2_seeds else None
        ft_one = mean(lambda s: sum(mine[b][s]["finetune_s"] for b in BUDGETS))
        ft_cap = mean(lambda s: sum(indep["cap"][b][s]["finetune_s"] for b in BUDGETS))
        ratio = (search + query) / (cap5 / len(BUDGETS))
        summary[method] = {"ratio_one_cap": ratio, "seeds": len(seeds), "one_run_s": search + query}
        rows.append([method, f"{search:.0f}", f"{query:.1f}", f"{search + query:.0f}", f"{cap5 / len(BUDGETS):.1f}",
                     f"{cap5:.0f}", "-" if l25 is None else f"{l25:.1f}", f"{ratio:.1f}x",
                     f"{(search + query) / cap5:.2f}x", f"{search + query + ft_one:.0f} / {cap5 + ft_cap:.0f}"
                     f" ({(search + query + ft_one) / (cap5 + ft_cap):.2f}x)", len(seeds)])
    return rows, summary


def equal_compute_lines(results: dict[str, Any], ds: str) -> list[str]:
    """Markdown lines on the two equal-compute controls: the conditional ``cacp`` search against
    the per-target ones (``cacp:single``), and the ``ofa`` run against the extra fine-tune
    seconds of ``cap+time``; per seed, the mean over the budgets done, times five. Empty before
    any control row is done."""
    caps = {b: _ok(results, ds, row_name("cap", b)) for b in BUDGETS}
    lines = []
    for method, ref, what in (("cacp", PER_TARGET, "search"), ("ofa", CAP_TIME, "extra fine-tune")):
        refs = {b: _ok(results, ds, row_name(ref, b)) for b in BUDGETS}
        per_seed: dict[int, list[float]] = {}  # seed -> the cost of each ref row done
        for b, runs in refs.items():
            for seed, r in runs.items():
                if ref == PER_TARGET:
                    per_seed.setdefault(seed, []).append(r["prune_s"])
                elif seed in caps[b]:
                    per_seed.setdefault(seed, []).append(r["finetune_s"] - caps[b][seed]["finetune_s"])
        cost = {s: statistics.mean(c) for s, c in per_seed.items() if _search_s(results, ds, method, s) is not None}
        if cost:
            one = statistics.mean(_search_s(results, ds, method, s) for s in cost)
            five = len(BUDGETS) * statistics.mean(cost.values())
            lines.append(f"* `{method}` against `{ref}` (mean over {len(cost)} seed(s)): the one {method} run "
                         f"{one:.0f} s; five `{ref}` rows' {what} {five:.0f} s (five times the mean per budget run).")
    return (["### Equal-compute controls", ""] + lines + [""]) if lines else []


def gaps(results: dict[str, Any], ds: str, method: str, ref: str, key: str = "top1_ft") -> dict[float, list[float]]:
    """Budget -> per-seed ``key`` accuracy of ``method`` minus ``ref``'s (seeds with both)."""
    out = {}
    for b in BUDGETS:
        a, r = _ok(results, ds, row_name(method, b)), _ok(results, ds, row_name(ref, b))
        out[b] = [a[s][key] - r[s][key] for s in sorted(set(a) & set(r))]
    return out


def plot_points(results: dict[str, Any], ds: str) -> list[dict[str, Any]]:
    """Mean fine-tuned top-1 against mean FLOPs per (method, budget), the baseline as the
    reference, each marked when on the Pareto front of them all."""
    from scipy import stats

    base = results["baselines"][ds]
    points = [{"flops": base["flops"], "top1": base["top1"], "reference": True, "label": "baseline"}]
    for method in METHODS:
        for b in BUDGETS:
            runs = list(_ok(results, ds, row_name(method, b)).values())
            if not runs:
                continue
            acc = [r["top1_ft"] for r in runs]
            err = stats.t.ppf(0.975, len(acc) - 1) * statistics.stdev(acc) / len(acc) ** 0.5 if len(acc) > 1 else None
            points.append({"group": method, "flops": statistics.mean(r["flops"] for r in runs),
                           "top1": statistics.mean(acc), "err": err, "label": ""})
    for i in pareto_front([(p["flops"], p["top1"]) for p in points]):
        points[i]["front_flops"] = True
    return points


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """``path``: one panel per data set with results, fine-tuned accuracy against FLOPs per
    method and the Pareto front (``prunekit.plot.draw_pareto``). False when nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from prunekit.plot import draw_pareto, write_png

    shown = [ds for ds in mb.DATASETS if ds in results.get("baselines", {}) and len(plot_points(results, ds)) > 1]
    if not shown:
        return False
    fig = Figure(figsize=(5.5 * len(shown), 4.4), dpi=110)
    FigureCanvasAgg(fig)
    for i, ds in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        draw_pareto(ax, plot_points(results, ds))
        ax.set_title(f"{ds}: fine-tuned, budgets {BUDGETS[0]:g}-{BUDGETS[-1]:g}")
    write_png(fig, path)
    return True


def _per(values: dict[str, Any]) -> str:
    """``{"fashion-mnist": 80}`` as ``80 on fashion-mnist``."""
    return ", ".join(f"{v} on {k}" for k, v in values.items())


def report(results: dict[str, Any], path: Path) -> None:
    """Write the Markdown tables of ``results`` to ``path`` and the plot beside it (``.png``)."""
    cfg = results["config"]
    lines = [f"# {TITLE}", "", machine_line(results["machine"]), "",
             f"Budgets (FLOPs kept): {', '.join(f'{b:g}' for b in BUDGETS)}; classifier kept. One run per (data set, "
             f"seed) serves all five: `cacp` ({cfg['cacp_episodes']} episodes, targets "
             f"{', '.join(f'{c:g}' for c in cfg['cacp_targets'])}, queried per budget) and `ofa` ({cfg['ofa_epochs']} "
             f"epochs, steps per epoch capped at {_per(cfg['ofa_steps_per_epoch']) or 'none'}, structure search at most "
             f"{cfg['ofa_search_epochs']}, {cfg['ofa_random']} random member(s) per step, resolution 1.0); `cap`, "
             f"`criterion:l2` and `cacp:single` (the agent unconditioned, searched on that budget alone for "
             f"{single_episodes(cfg['cacp_episodes'])} episodes: the five together spend the conditional "
             "run's) and `cap+time` (cap fine-tuned longer by a fifth of the ofa run's seconds) run once per "
             "budget. Shared fine-tune for every row: SGD momentum 0.9, cosine from the "
             "LR to 0, weight decay 5e-4, batch 128, augmentation, epochs: "
             + _per(cfg["ft_epochs"])
             + (f" (steps per epoch capped: {_per(cfg['ft_steps_per_epoch'])})" if cfg.get("ft_steps_per_epoch") else "")
             + ". Accuracy: full test splits; mean ± half-width of the 95% t-interval over the seeds. See the "
             "script's docstring for the protocol and the compute accounting.", ""]
    for ds in mb.DATASETS:
        base = results.get("baselines", {}).get(ds)
        if base is None:
            continue
        lines += [f"## {ds}", "",
                  f"Baseline: test top-1 {base['top1'] * 100:.2f}%, {base['params'] / 1e3:.1f}K params, "
                  f"{base['flops'] / 1e6:.2f} MFLOPs. Fine-tune LR {cfg['ft_lr'].get(ds)} "
                  f"({cfg.get('lr_source', {}).get(ds, '?')}); {results.get('ft_steps', {}).get(ds, '?')} fine-tune "
                  "steps.", ""]
        body = []
        for b in BUDGETS:
            for method in METHODS:
                row = row_name(method, b)
                runs = list(_ok(results, ds, row).values())
                fails = [r for r in results["runs"].values() if r["dataset"] == ds and r["row"] == row
                         and r["status"] != "ok"]
                if not runs:
                    if fails:
                        body.append([f"{b:g}", method, "FAIL: " + fails[0].get("error", "?")[:90]] + [""] * 5)
                    continue
                fl = [r["flops"] / base["flops"] for r in runs]
                body.append([f"{b:g}", method, mb.interval([r["top1_no_ft"] for r in runs]),
                             mb.interval([r["top1_ft"] for r in runs]),
                             f"{statistics.mean(fl):.4f}" + (f" ({min(fl):.4f}-{max(fl):.4f})" if max(fl) > min(fl) else ""),
                             f"{statistics.mean(r['prune_s'] for r in runs):.1f}",
                             f"{statistics.mean(r['finetune_s'] for r in runs):.0f}", len(runs)])
        if body:
            lines += ["### Accuracy per budget", "",
                      md_table(["budget", "method", "top-1 % no FT", "top-1 % FT", "FLOPs kept",
                                "prune / query s", "fine-tune s", "seeds"], body), ""]
        gap_rows, worst = [], {}
        for b in BUDGETS:
            cells = [f"{b:g}"]
            for method, ref in GAP_PAIRS:
                g = gaps(results, ds, method, ref)[b]
                g0 = gaps(results, ds, method, ref, "top1_no_ft")[b]
                cells.append(f"{mb.interval(g)} ({mb.interval(g0)})" if g else "-")
                if g:
                    worst.setdefault((method, ref), []).append(statistics.mean(g))
            gap_rows.append(cells)
        if worst:
            lines += ["### Gaps to the independent runs (points, fine-tuned; without fine-tune in brackets)", "",
                      md_table(["budget"] + [f"{m} − {r}" for m, r in GAP_PAIRS], gap_rows), "",
                      "Paired per seed (same seed, calibration batches and fine-tune order); mean ± 95% half-width. "
                      f"The last two columns are the equal-compute controls: `{PER_TARGET}` (five searches of a fifth "
                      f"of the episodes each) and `{CAP_TIME}` (cap fine-tuned longer by a fifth of the ofa run's "
                      "seconds).", ""]
        lines += equal_compute_lines(results, ds)
        comp, summary = compute_table(results, ds)
        if comp:
            lines += ["### Compute (seconds, mean over seeds)", "",
                      md_table(["one run", "search s (once)", "5 queries s", "one run, 5 budgets s",
                                "one cap run s", "5 cap runs s", "5 l2 runs s", "vs one cap run",
                                "vs 5 cap runs", "with fine-tunes: one run / 5 cap s", "seeds"], comp), ""]
        verdict = []
        for method in ONE_RUN:
            for ref in INDEPENDENT:
                w = worst.get((method, ref))
                if not w or method not in summary:
                    continue
                ratio = summary[method]["ratio_one_cap"]
                complete = len(w) == len(BUDGETS)
                ok_gap, ok_ratio = min(w) >= -TARGET_GAP, ratio <= TARGET_RATIO
                verdict.append(f"* `{method}` vs `{ref}`: compute {ratio:.1f}x one `cap` run (target ≤ "
                               f"{TARGET_RATIO:g}x: {'met' if ok_ratio else 'not met'}); worst budget gap "
                               f"{100 * min(w):+.2f} pt (target ≥ −{100 * TARGET_GAP:.1f}: "
                               f"{'met' if ok_gap else 'not met'}){'' if complete else ' (not every budget has results)'}"
                               f"; target {'MET' if ok_gap and ok_ratio and complete else 'not met'} "
                               f"(over {summary[method]['seeds']} seed(s)).")
        if verdict:
            lines += ["### The issue's target", ""] + verdict + [""]
        searches = {k: v for k, v in results.get("searches", {}).items() if k.startswith(f"{ds}/")}
        notes = []
        for key, rec in sorted(searches.items()):
            if rec.get("status") != "ok":
                notes.append(f"* `{key}`: FAILED: {rec.get('error', '?')[:150]}")
                continue
            info = rec["info"]
            if "/cacp/" in key:
                last = info.get("trajectory_summary", {}).get("last_quarter", {})
                notes.append(f"* `{key}`: {info['episodes']} episodes ({info['warmup']} random) in {rec['seconds']:.0f} s; "
                             f"best reward {info['best_reward']:.4f}; mean reward over the last quarter per target: "
                             + ", ".join(f"{k}: {v:.4f}" for k, v in last.items()))
            else:
                s = info["search"]
                notes.append(f"* `{key}`: {info['epochs']} epochs / {info['steps']} steps in {rec['seconds']:.0f} s; "
                             f"structure search stopped at epoch {s['stop_epoch']} "
                             f"({'converged' if s['converged'] else 'at the cap'}; similarities "
                             + ", ".join(f"{v:.3f}" for v in s["similarities"]) + "); members' FLOPs kept "
                             + ", ".join(f"{m['rate']:g}: {m['flops_fraction']:.3f}" for m in info["members"]))
        if notes:
            lines += ["### Search runs", ""] + notes + [""]
    png = path.with_suffix(".png")
    if write_plot(results, png):
        lines += [f"![fine-tuned accuracy against FLOPs, Pareto front]({png.name})", ""]
    lines += ["Columns: *FLOPs kept* is the mean achieved ratio (`count_flops`; range over seeds when they differ); "
              "*prune / query s* is the row's pruning time: for `cacp`/`ofa` the query/extraction of the budget from "
              "the one run (the search is in the compute table, counted once); *vs one cap run* = (search + 5 "
              "queries) / mean prune seconds of one `cap` run, the issue's compute target. Times are wall seconds on "
              "a shared 2-core CPU and only comparable within one run.", ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: those of ``methods.py`` plus the LR source, the methods and the
    sizes of the search runs."""
    p = mb.common_parser(__doc__.split("\n\n")[0], list(ROWS), 0.5, RESULTS_DIR / "many_budgets.json")
    p.set_defaults(ft_epochs=DEFAULT_FT_EPOCHS, ft_steps_per_epoch=DEFAULT_FT_STEPS, threads=1)
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(METHODS)} (all budgets; "
                                                   "overrides --rows)")
    # Tuned here by default: methods.py tuned its LR for a longer fine-tune (10 CIFAR-10 epochs), and
    # at this brief one its 0.1 left cap's models below their accuracy before fine-tuning.
    p.add_argument("--lr-from", default="",
                   help="results JSON of methods.py whose tuned fine-tune LR to use (when its grid is complete); "
                        "default: tuned here on validation with this script's fine-tune")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "many_budgets"), help="where the search runs are cached")
    p.add_argument("--cacp-episodes", type=int, default=150)
    p.add_argument("--cacp-targets", default="0.3,0.5,0.7", help="targets c the cacp policy is trained on")
    p.add_argument("--ofa-epochs", type=int, default=4)
    p.add_argument("--ofa-steps-per-epoch", default="fashion-mnist=50", help="cap per data set on OFA's steps per epoch")
    p.add_argument("--ofa-search-epochs", type=int, default=2, help="most epochs of OFA's structure search")
    p.add_argument("--ofa-random", type=int, default=2, help="random members per OFA step besides largest and smallest")
    args = mb.finish_args(p.parse_args(argv))
    if args.methods:
        unknown = [m for m in args.methods.split(",") if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
        args.rows = ",".join(r for r in ROWS if split_row(r)[0] in args.methods.split(","))
    args.cacp_targets = [float(c) for c in args.cacp_targets.split(",") if c]
    args.ofa_steps_per_epoch = mb.per_dataset(args.ofa_steps_per_epoch)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    old = dict(json.loads(Path(args.results).read_text()).get("config", {})) if Path(args.results).exists() else {}
    results_path, results, datasets, rows, seeds = mb.begin(args, ROWS, {
        "budgets": list(BUDGETS), "calib_batches": args.calib_batches, "ft_epochs": args.ft_epochs,
        "ft_steps_per_epoch": args.ft_steps_per_epoch, "threads": args.threads, "max_steps": args.max_steps,
        "cacp_episodes": args.cacp_episodes, "cacp_targets": args.cacp_targets, "ofa_epochs": args.ofa_epochs,
        "ofa_steps_per_epoch": args.ofa_steps_per_epoch, "ofa_search_epochs": args.ofa_search_epochs,
        "ofa_random": args.ofa_random})
    md = results_path.with_suffix(".md")
    if args.report_only:
        results["config"].update(old)  # the settings the results were made with
        report(results, md)
        return 0
    torch.set_num_threads(args.threads)
    loaded = mb.load_all(args, datasets, results)
    mb.set_lrs(args, loaded, results)
    drop_superseded(results, args)
    write_json(results_path, results)
    for seed in seeds:  # seeds outermost; within a seed, a data set's search runs right before its rows
        for ds, (base, data) in loaded.items():
            ctx = mb.Ctx(base, data, data.calib(args.calib_batches, seed), seed, args, mb.steps_of(ds, data, args))
            for method in ONE_RUN:
                if any(pending(results, ds, r, seed, args) for r in rows if split_row(r)[0] == method):
                    ensure_search(method, ctx, args, results, results_path)
            mb.run_grid(args, results, {ds: (base, data)}, rows, [seed], results_path, lambda: report(results, md),
                        ROWS, longer=LONGER)
            for key in [k for k in _STORE if k[:2] == (ds, seed)]:
                del _STORE[key]  # a seed's runs are not needed again
    report(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
