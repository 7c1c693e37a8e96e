"""Replacement surgery: :class:`~prunekit.plan.Replace` and :class:`~prunekit.plan.Drop`
steps, recorded in the :class:`~prunekit.surgery.Journal` so a failure rolls them back, and
a structural validator for plans that change which ops run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from prunekit._perf import walk
from prunekit.errors import PruningError
from prunekit.plan import Drop, PruningPlan, Replace, Slice, Step
from prunekit.surgery.factories import Zero, build, describe

__all__ = ["apply_structural", "replace_step", "replacement_steps", "check_structure"]


def replace_step(module_name: str, new: nn.Module) -> Replace:
    """The :class:`Replace` step putting ``new`` (built from registered factories, see
    :func:`~prunekit.surgery.factories.describe`) at ``module_name``, carrying its tensors."""
    factory, args = describe(new)
    return Replace(module_name, factory, args, state={k: v.detach() for k, v in new.state_dict().items()})


def replacement_steps(model: nn.Module, step: Slice) -> list[Replace]:
    """The Replace steps that must follow ``step`` (a channel slice of ``model``): one for each
    module whose handler says its class cannot run its sliced tensors
    (:meth:`~prunekit.handlers.LayerHandler.replacement`, e.g. an ``nn.MultiheadAttention``
    that lost heads and embedding channels in different numbers); the replacement takes
    over the module's tensors (``keeps_tensors``), so later slices still describe it. Each
    such module is sliced on its own copy to ask; ``model`` is not changed. The root module
    cannot be replaced: a root that would need it is left to validation."""
    from prunekit.handlers import LayerHandler, handler_for
    from prunekit.surgery import apply_plan

    steps = []
    for name, mod in walk(model):
        handler = handler_for(mod)
        if not name or handler is None or type(handler).replacement is LayerHandler.replacement:
            continue
        prefix = name + "."
        local = {n[len(prefix):]: dims for n, dims in step.keep.items() if n.startswith(prefix)}
        if not local:
            continue
        shapes = {n[len(prefix):]: s for n, s in step.shapes.items() if n.startswith(prefix)}
        new = handler.replacement(apply_plan(mod, PruningPlan((Slice(local, shapes),))))
        if new is not None:
            steps.append(Replace(name, *describe(new), keeps_tensors=True))
    return steps


def _locate(model: nn.Module, name: str, what: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, key in ``parent._modules``, module) of ``name``; PruningError naming it."""
    if not name:
        raise PruningError(f"plan {what}: the root module cannot be {what}d")
    parent_name, _, key = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise PruningError(f"plan {what}s '{name}', but the model has no module '{parent_name}'") from None
    mod = parent._modules.get(key)
    if mod is None:
        raise PruningError(f"plan {what}s '{name}', but module '{parent_name or '<root>'}' has no child '{key}'")
    return parent, key, mod


def _placement(old: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in list(old.parameters()) + list(old.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def apply_structural(model: nn.Module, step: Step, journal: Any) -> None:
    """Apply one Replace/Drop step to ``model`` in place, recording it in ``journal``. The
    new module takes the old one's device, floating dtype and train/eval flag."""
    if isinstance(step, Replace):
        parent, key, old = _locate(model, step.module, "replace")
        new = build(step.factory, step.args)
        state = step.state if step.state is not None else old.state_dict() if step.keeps_tensors else None
        if state is not None:
            try:
                new.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise PruningError(f"plan replaces '{step.module}': its tensors do not fit factory "
                                   f"'{step.factory}': {str(exc).splitlines()[0]}") from None
        device, dtype = _placement(old)
        if device is not None:
            new.to(device=device, dtype=dtype)
        new.train(old.training)
        journal.set(parent, "module", key, new)
    elif isinstance(step, Drop):
        parent, key, old = _locate(model, step.module, "drop")
        if step.mode == "remove":
            if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
                raise PruningError(f"plan removes '{step.module}', but its parent is a {type(parent).__name__}, "
                                   "not an nn.Sequential/nn.ModuleList (use mode 'identity' or 'zero')")
            journal.set(parent, "modules", "", {k: m for k, m in parent._modules.items() if k != key})
        else:
            new = nn.Identity() if step.mode == "identity" else Zero()
            new.train(old.training)
            journal.set(parent, "module", key, new)
    else:
        raise PruningError(f"not a structural plan step: {type(step).__name__}")


def check_structure(original: nn.Module, pruned: nn.Module, example_inputs: Any,
                    plan: PruningPlan | None = None) -> str | None:
    """Check a model whose op sequence changed: it runs in eval and train mode (BatchNorm
    statistics untouched), its outputs have the original's structure, shapes and dtypes,
    and every module a Replace step put in has the tensors its factory builds (unless a
    later step slices, replaces or drops it, or a module around or inside it). Returns a
    message naming the first problem, or None when all holds."""
    from prunekit.runtime import call, inputs_for, model_mode

    for mode in ("eval", "train"):
        outs = []
        for name, m in (("original", original), ("pruned", pruned)):
            try:
                with model_mode(m, mode), torch.no_grad():
                    outs.append(tree_flatten(call(m, inputs_for(example_inputs, mode)))[0])
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                return f"{name} model fails in {mode} mode: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        a, b = outs
        if len(a) != len(b):
            return f"{mode} mode: {len(b)} outputs, the original has {len(a)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if isinstance(x, Tensor) != isinstance(y, Tensor):
                return f"{mode} mode: output {i} is {type(y).__name__}, the original's is {type(x).__name__}"
            if isinstance(x, Tensor) and (x.shape != y.shape or x.dtype != y.dtype):
                return (f"{mode} mode: output {i} is {tuple(y.shape)} {y.dtype}, "
                        f"the original's is {tuple(x.shape)} {x.dtype}")
    if plan is not None:
        for i, step in enumerate(plan.steps):
            if isinstance(step, Replace) and not _changed_later(step.module, plan.steps[i + 1:]):
                want = {k: tuple(v.shape) for k, v in build(step.factory, step.args).state_dict().items()}
                try:
                    got_mod = pruned.get_submodule(step.module)
                except AttributeError:
                    return f"Replace '{step.module}': the pruned model has no such module"
                got = {k: tuple(v.shape) for k, v in got_mod.state_dict().items()}
                if got != want:
                    return f"Replace '{step.module}': tensors {got} differ from factory '{step.factory}' ({want})"
    return None


def _changed_later(module: str, later: tuple[Step, ...] | list[Step]) -> bool:
    """Whether a step of ``later`` slices a tensor of ``module`` (or of a submodule), or
    replaces or drops ``module``, a module it sits in or one inside it: its tensors are then
    no longer the ones its factory builds."""
    def related(other: str) -> bool:
        return other == module or other.startswith(module + ".") or module.startswith(other + ".") or not other

    for s in later:
        if isinstance(s, (Replace, Drop)) and related(s.module):
            return True
        if isinstance(s, Slice) and any(t.startswith(module + ".") for t in s.keep):
            return True
    return False
