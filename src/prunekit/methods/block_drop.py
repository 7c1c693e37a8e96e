"""Depth pruning: remove whole residual branches, ranked by a criterion, under a budget.

Not one paper's method but the common recipe of block-removal work (rank the residual
blocks, drop the least important, optionally prune channels after):

  1. **Blocks.** The residual joins of a traced pass (:meth:`DependencyGraph.blocks`). A
     block is a candidate when its shortcut is the identity (a projection shortcut changes
     the shape, so its branch cannot go without changing the stage), its branch ends in a
     module whose output is the add's operand, and it touches no ignored module. Dropping
     it is a list of ``Drop`` steps: the branch's last module outputs zeros shaped like its
     input (``'zero'``), every other module called only on the branch becomes an identity
     (modules also called elsewhere, such as a ResNet block's shared ReLU, stay). Each
     candidate is checked by running it: the dropped network must compute the original with
     that branch's output set to zero (else it is not a candidate, with the reason).
  2. **Rank** (``criterion``), least important first:
     ``norm`` — the mean over calibration samples of the L2 norm of the branch output
     (the output of its last module); ``recon`` — the relative squared error
     ``|h' - h|^2 / |h|^2`` of the next block's input (the input of its first branch module
     called once; the model output after the last block) when this branch alone is
     dropped, over the calibration batches; ``val_loss`` — the validation loss increase
     when it alone is dropped (``evaluate(model) -> loss`` or the mean cross-entropy on
     ``val_loader``).
  3. **Drop under the budget.** ``target_flops`` / ``target_params`` (fractions kept): the
     saving of each branch is measured on its dropped network, and
     :func:`prunekit.allocate.units.greedy_removal` takes branches in rank order until the
     target holds, then puts back the most important ones whose return still meets it; the
     remaining gap is below the saving of every dropped branch (the exact best subset can
     be closer). Without a target, ``ratio`` is the fraction of candidate blocks dropped.
     ``res.info["budget"]`` says how close it landed (and whether within 2%).
  4. **Then channels** (``then_channels``): a ratio, or a dict of :func:`prunekit.prune`
     options whose ``target_*`` are fractions of the *original* model, prunes channels of
     the depth-pruned network; the plans are composed, so the result saves and loads.

The ranking is computed once, on the full network (blocks are not re-scored after each
drop), and nothing is fine-tuned.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

import prunekit as pk
from prunekit.allocate.budget import make_budget
from prunekit.allocate.units import budget_report, check_target_kind, greedy_removal
from prunekit.config import TARGETS, make_config
from prunekit.errors import PruningError
from prunekit.features import as_batch
from prunekit.graph import DependencyGraph, ResidualBlock, module_names, under
from prunekit.measure import count_flops, count_params
from prunekit.methods import MethodResult, budget_config, register, take_batches
from prunekit.plan import Drop, PruningPlan, compose
from prunekit.runtime import output_tensors
from prunekit.surgery import apply_plan

log = logging.getLogger(__name__)

__all__ = ["CRITERIA", "Candidate", "block_drop", "candidates", "score_blocks"]

CRITERIA = ("norm", "recon", "val_loss")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A droppable residual branch: its block (``name`` of the block's module, ``add_op``),
    the module whose output is the branch output (``exit``), the steps that drop it and
    where the next block's input is read (``probe``: a module whose input it is; None for
    the model output)."""

    name: str
    add_op: int
    exit: str
    steps: tuple[Drop, ...]
    probe: str | None


def _drop_steps(graph: DependencyGraph, block: ResidualBlock, times: Counter, ignore: tuple[str, ...]) -> \
        tuple[tuple[Drop, ...], str] | str:
    """``(steps, exit module)`` dropping ``block``'s branch, or the reason it cannot go."""
    if not block.identity_shortcut:
        return "projection shortcut (the branch cannot go without changing the shape)"
    if any(under(m, ignore) for m in block.branch_modules) or (block.name and under(block.name, ignore)):
        return "ignored"
    ops = graph.ops("eval")
    calls = graph.state.calls["eval"]
    operands = set(ops[block.add_op].in_values)
    exit_name = block.branch_modules[-1]
    exit_calls = [c for c in calls if c.name == exit_name]
    if times[exit_name] != 1 or not exit_calls or not set(exit_calls[0].out_values[:1]) & operands:
        return f"the branch's last module '{exit_name}' is not the one producing the add's operand"
    steps = [Drop(m, "identity") for m in block.branch_modules[:-1] if times[m] == 1]
    return tuple(steps) + (Drop(exit_name, "zero"),), exit_name


def candidates(model: nn.Module, example_inputs: Any, graph: DependencyGraph,
               ignore: tuple[str, ...] = ()) -> tuple[list[Candidate], dict[str, str]]:
    """The residual branches of ``graph`` that can be dropped, in execution order, and the
    reason for every other block (keyed ``"<name>@<add op>"``). Each candidate is checked:
    its dropped network must compute ``model`` with the branch output zeroed."""
    blocks = graph.blocks()
    calls = graph.state.calls["eval"]
    parents = {c.parent for c in calls}
    times = Counter(c.name for c in calls if c.index not in parents)
    found: list[Candidate] = []
    skipped: dict[str, str] = {}
    for i, b in enumerate(blocks):
        key = _key(b)
        got = _drop_steps(graph, b, times, ignore)
        if isinstance(got, str):
            skipped[key] = got
            continue
        steps, exit_name = got
        probe = next((m for nb in blocks[i + 1:] for m in nb.branch_modules[:1] if times[m] == 1), None)
        cand = Candidate(b.name, b.add_op, exit_name, steps, probe)
        problem = _check(model, example_inputs, cand)
        if problem is None:
            found.append(cand)
        else:
            skipped[key] = problem
    return found, skipped


def _dropped(model: nn.Module, cands: Iterable[Candidate]) -> nn.Module:
    return apply_plan(model, PruningPlan(tuple(s for c in cands for s in c.steps)))


def _check(model: nn.Module, example_inputs: Any, cand: Candidate) -> str | None:
    """None when dropping ``cand`` computes ``model`` with the branch output zeroed (eval
    mode), else what went wrong."""
    try:
        dropped = output_tensors(_dropped(model, [cand]), example_inputs)
    except Exception as exc:  # noqa: BLE001 - a branch that cannot go is reported, not raised
        return f"the dropped network fails: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    exit_mod = model.get_submodule(cand.exit)
    handle = exit_mod.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        zeroed = output_tensors(model, example_inputs)
    finally:
        handle.remove()
    if len(dropped) != len(zeroed) or any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                                          for a, b in zip(dropped, zeroed)):
        return "dropping it does not compute the network with a zero branch output"
    return None


def _probeoutput_tensors(model: nn.Module, probe: str | None, batches: list[Any]) -> list[Tensor]:
    """The input of module ``probe`` (the model output when None), per batch."""
    seen: list[Tensor] = []
    handle = None
    if probe is not None:
        handle = model.get_submodule(probe).register_forward_pre_hook(
            lambda m, args: seen.append(args[0].detach().double()))
    try:
        for x in batches:
            out = output_tensors(model, x)
            if probe is None:
                seen.append(out[0].detach().double())
    finally:
        if handle is not None:
            handle.remove()
    return seen


def score_blocks(model: nn.Module, cands: list[Candidate], criterion: str, *, batches: list[Any] | None = None,
                 evaluate: Callable[[nn.Module], float] | None = None) -> list[float]:
    """Importance of each candidate branch by ``criterion`` (see the module docstring; lower
    is less important): ``norm`` and ``recon`` read the calibration ``batches`` (inputs);
    ``val_loss`` calls ``evaluate(model) -> validation loss``."""
    if criterion == "norm":
        sums = [0.0] * len(cands)
        count = 0
        handles = [model.get_submodule(c.exit).register_forward_hook(_norm_hook(sums, i)) for i, c in enumerate(cands)]
        try:
            for x in batches or []:
                out = output_tensors(model, x)
                count += int(out[0].shape[0]) if out and out[0].ndim else 1
        finally:
            for h in handles:
                h.remove()
        return [s / max(1, count) for s in sums]
    if criterion == "recon":
        scores = []
        refs: dict[str | None, list[Tensor]] = {}
        for c in cands:
            if c.probe not in refs:
                refs[c.probe] = _probeoutput_tensors(model, c.probe, batches or [])
            ref = refs[c.probe]
            new = _probeoutput_tensors(_dropped(model, [c]), c.probe, batches or [])
            err = sum(float(((a - b) ** 2).sum()) for a, b in zip(new, ref))
            scores.append(err / max(sum(float((b ** 2).sum()) for b in ref), 1e-30))
        return scores
    if criterion == "val_loss":
        assert evaluate is not None
        with torch.no_grad():
            base = float(evaluate(model))
            return [float(evaluate(_dropped(model, [c]))) - base for c in cands]
    raise PruningError(f"block_drop: unknown criterion {criterion!r} (known: {', '.join(CRITERIA)})")


def _norm_hook(sums: list[float], i: int) -> Callable[..., None]:
    def hook(mod: nn.Module, args: Any, out: Tensor) -> None:
        # One L2 norm per sample (over everything but the batch dim), summed over samples.
        sums[i] += float(out.detach().double().flatten(1).norm(dim=1).sum()) if out.ndim > 1 else float(out.norm())
    return hook


def _channel_options(then: Any, depth_kept: dict[str, float], check_only: bool = False) -> dict[str, Any]:
    """:func:`prunekit.prune` options for the channel step: a ratio, or a dict whose targets
    (fractions of the original) become fractions of the depth-pruned network, which kept
    ``depth_kept`` of the original; ``check_only`` checks the form and kinds alone."""
    if isinstance(then, (int, float)) and not isinstance(then, bool):
        return {"ratio": float(then)}
    if not isinstance(then, dict):
        raise PruningError(f"block_drop: then_channels must be a ratio or a dict of prunekit.prune options, "
                           f"got {type(then).__name__}")
    opts = dict(then)
    for key in TARGETS:
        if opts.get(key) is not None:
            kind = key.removeprefix("target_")
            if kind not in depth_kept:
                raise PruningError(f"block_drop: then_channels {key} is not supported (use target_flops/target_params)")
            rel = opts[key] / depth_kept[kind]
            if not 0 < rel < 1 and not check_only:
                raise PruningError(f"block_drop: then_channels {key}={opts[key]} is not below what dropping blocks "
                                   f"kept ({depth_kept[kind]:.3f} of the original); nothing left for channels")
            opts[key] = rel
    return opts


@register("block_drop")
def block_drop(model: nn.Module, example_inputs: Any, *, loader: Iterable[Any] | None = None, batches: int = 8,
               criterion: str = "norm", evaluate: Callable[[nn.Module], float] | None = None,
               val_loader: Iterable[Any] | None = None, then_channels: float | dict[str, Any] | None = None,
               **kwargs: Any) -> MethodResult:
    """Drop the least important residual branches under the budget in ``kwargs``
    (``target_flops`` / ``target_params``, else ``ratio`` = fraction of candidate blocks;
    ``ignore`` keeps blocks touching those modules), ranked by ``criterion`` (``norm``,
    ``recon``: the first ``batches`` of ``loader``; ``val_loss``: ``evaluate(model) -> loss``
    or ``val_loader``), then optionally prune channels (``then_channels``). The user's model
    is not changed. Returns the model (eval mode), its plan (``Drop`` steps, then the
    channel slices) and ``info``: candidates and skipped blocks with reasons, scores, the
    order, the dropped blocks, the budget reached, FLOPs/params kept. Raises
    :class:`PruningError` for bad options, missing data, no candidate block or a latency
    target."""
    if criterion not in CRITERIA:
        raise PruningError(f"block_drop: unknown criterion {criterion!r} (known: {', '.join(CRITERIA)})")
    cfg = budget_config(kwargs, "block_drop")
    check_target_kind(cfg.target, "block_drop")
    if then_channels is not None:
        _channel_options(then_channels, {"flops": 1.0, "params": 1.0}, check_only=True)  # fail before any work
    calib: list[Any] = []
    if criterion in ("norm", "recon"):
        calib = [as_batch(b)[0] for b in take_batches(loader, batches, "block_drop")]
    elif evaluate is None:
        if val_loader is None:
            raise PruningError("block_drop: criterion 'val_loss' needs evaluate= (model -> validation loss) "
                               "or val_loader= (batches of (inputs, targets))")
        from prunekit.recover.evaluate import evaluate as classify

        evaluate = lambda m: classify(m, val_loader)["loss"]  # noqa: E731

    ignore = module_names(model, list(cfg.ignore), "ignore") if cfg.ignore else ()
    graph = pk.trace(model, example_inputs)
    cands, skipped = candidates(model, example_inputs, graph, ignore)
    if not cands:
        raise PruningError(f"block_drop: no residual branch can be dropped ({skipped or 'no residual blocks'})")
    scores = score_blocks(model, cands, criterion, batches=calib, evaluate=evaluate)
    order = sorted(range(len(cands)), key=lambda i: scores[i])

    info: dict[str, Any] = {"criterion": criterion}
    if cfg.target is not None:
        budget = make_budget(model, example_inputs, cfg)
        assert budget is not None
        saved = [1.0 - budget.measure(_dropped(model, [c])) / budget.base for c in cands]
        chosen = greedy_removal(order, saved, budget.target)
        if sum(saved[i] for i in chosen) < 1.0 - budget.target:
            log.warning("block_drop: dropping every candidate block keeps more than the %s target %.3f",
                        budget.kind, budget.target)
        info["saved"] = {_key(cands[i]): saved[i] for i in range(len(cands))}
    else:
        chosen = order[:int(round(cfg.ratio * len(cands)))]
    dropped = [cands[i] for i in sorted(chosen)]
    small = _dropped(model, dropped).eval()
    plan = PruningPlan(tuple(s for c in dropped for s in c.steps),
                       {"method": "block_drop", "criterion": criterion, "dropped_blocks": [_key(c) for c in dropped]})
    base_flops, base_params = count_flops(model, example_inputs), count_params(model)
    depth_kept = {"flops": count_flops(small, example_inputs) / base_flops, "params": count_params(small) / base_params}
    if cfg.target is not None:
        info["budget"] = budget_report(budget.kind, budget.target, budget.measure(small) / budget.base)
    if then_channels is not None:
        opts = _channel_options(then_channels, depth_kept)
        if ignore and "ignore" not in opts:
            opts["ignore"] = list(ignore)  # the modules kept whole keep their channels too
        small, channel_plan = pk.prune(small, example_inputs, return_plan=True, **opts)
        shown = make_config(None, **opts).to_dict()  # JSON-able (callables by name, modules by type)
        plan = compose(plan, channel_plan).with_meta(method="block_drop", dropped_blocks=plan.meta["dropped_blocks"],
                                                      then_channels={k: shown[k] for k in opts})
        small.eval()
    info.update({
        "candidates": [_key(c) for c in cands], "skipped": skipped,
        "scores": {_key(c): scores[i] for i, c in enumerate(cands)}, "order": [_key(cands[i]) for i in order],
        "dropped": [_key(c) for c in dropped], "depth_kept": depth_kept,
        "flops_kept": count_flops(small, example_inputs) / base_flops, "params_kept": count_params(small) / base_params,
    })
    return MethodResult(small, plan, info)


def _key(block: Candidate | ResidualBlock) -> str:
    """How a block is named in ``info``: its module (``<root>`` for the model) and add op."""
    return f"{block.name or '<root>'}@{block.add_op}"

