"""Apply plans: slice parameters/buffers, fix module attributes, replace and drop modules.

Only this package changes a model. :func:`apply_plan` is all-or-nothing: a slice computes
and checks every new tensor before the first assignment, and :class:`Journal` records each
in-place change so that a failing step, or validation afterwards, can roll it all back.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunekit._perf import unique_modules, walk
from prunekit.errors import PruningError
from prunekit.handlers import handler_for
from prunekit.plan import AttrFix, PruningPlan, SetAttr, Slice

__all__ = ["Journal", "apply_plan", "copy_module", "fix_module_attrs", "get_tensor"]


def get_tensor(model: nn.Module, name: str, modules: dict[str, nn.Module] | None = None) -> Tensor:
    """Parameter or buffer of ``model`` by qualified name (PruningError if missing);
    ``modules`` (``dict(model.named_modules(remove_duplicate=False))``) speeds up many lookups."""
    mod_name, _, leaf = name.rpartition(".")
    if modules is not None:
        mod = modules.get(mod_name)
        if mod is None:
            raise PruningError(f"plan names '{name}', but the model has no module '{mod_name}'")
    else:
        try:
            mod = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise PruningError(f"plan names '{name}', but the model has no module '{mod_name}'") from None
    t = mod._parameters.get(leaf, mod._buffers.get(leaf))
    if t is None:
        raise PruningError(f"plan names '{name}', but module '{mod_name}' has no parameter or buffer '{leaf}'")
    return t


@dataclass
class Journal:
    """Undo log of an in-place change: ``rollback()`` restores every tensor, attribute and module."""

    entries: list[tuple[Any, str, str, Any]] = field(default_factory=list)

    def set(self, obj: Any, kind: str, key: str, value: Any) -> None:
        """Set ``obj.<kind>[key]`` (kind 'param', 'buffer', 'module' or 'attr') and remember
        the old value; kind 'modules' replaces ``obj._modules`` whole (``value``: the new
        ordered name -> module dict), which is how a module leaves a Sequential in order."""
        if kind in ("param", "buffer", "module"):
            store = obj._parameters if kind == "param" else obj._buffers if kind == "buffer" else obj._modules
            self.entries.append((obj, kind, key, store[key]))
            store[key] = value
        elif kind == "modules":
            self.entries.append((obj, kind, key, dict(obj._modules)))
            obj._modules.clear()
            obj._modules.update(value)
        else:
            old = getattr(obj, key)
            setattr(obj, key, value)  # first: an attribute that refuses the value (read-only) leaves no entry to undo
            self.entries.append((obj, kind, key, old))

    def rollback(self) -> None:
        """Undo every change, newest first."""
        for obj, kind, key, old in reversed(self.entries):
            if kind == "param":
                obj._parameters[key] = old
            elif kind == "buffer":
                obj._buffers[key] = old
            elif kind == "module":
                obj._modules[key] = old
            elif kind == "modules":
                obj._modules.clear()
                obj._modules.update(old)
            else:
                setattr(obj, key, old)
        self.entries.clear()


def apply_plan(model: nn.Module, plan: PruningPlan, *, inplace: bool = False, journal: Journal | None = None) -> nn.Module:
    """Return ``model`` with the plan's steps applied in order: channels physically removed
    (:class:`~prunekit.plan.Slice`), attributes set, modules replaced or dropped.

    A copy is changed unless ``inplace``. All or nothing: a plan that does not fit the model
    (other shapes, missing tensors or modules, an unknown factory) raises PruningError and
    leaves ``model`` as it was (in place, every change so far is rolled back).
    """
    from prunekit.surgery.replace import apply_structural

    journal = journal if journal is not None else Journal()
    steps = list(plan.steps)
    if not inplace:
        if steps and isinstance(steps[0], Slice):
            target = _sliced_copy(model, steps.pop(0))  # never copies the tensors it shrinks
        else:
            target = copy_module(model)
        journal = Journal()  # the copy is ours: a failure just drops it
    else:
        target = model
    mark = len(journal.entries)
    try:
        for step in steps:
            if isinstance(step, Slice):
                _slice_inplace(target, step, journal)
            elif isinstance(step, SetAttr):
                _set_attr(target, step, journal)
            else:
                apply_structural(target, step, journal)
    except BaseException:
        if inplace:
            undo = Journal(journal.entries[mark:])
            del journal.entries[mark:]
            undo.rollback()
        raise
    return target


def _sliced_copy(model: nn.Module, step: Slice) -> nn.Module:
    new = _sliced_tensors(model, step)
    target = copy_module(model, _tensor_memo(model, new))
    _check_result(target, step)
    fix_module_attrs(target, None, Journal())
    return target


def _slice_inplace(model: nn.Module, step: Slice, journal: Journal) -> None:
    new = _sliced_tensors(model, step)  # every new tensor is made and checked before the first change
    old_attrs = _snapshot_attrs(model)
    for mod in unique_modules(model):
        for key, t in list(mod._parameters.items()):
            if t is not None and id(t) in new:
                journal.set(mod, "param", key, nn.Parameter(new[id(t)], requires_grad=t.requires_grad))
        for key, t in list(mod._buffers.items()):
            if t is not None and id(t) in new:
                journal.set(mod, "buffer", key, new[id(t)])
    _share_new_parameters(model)
    fix_module_attrs(model, old_attrs, journal)


def _set_attr(model: nn.Module, step: SetAttr, journal: Journal) -> None:
    try:
        mod = model.get_submodule(step.module) if step.module else model
    except AttributeError:
        raise PruningError(f"plan sets '{step.attr}' of module '{step.module}', which the model does not have") from None
    journal.set(mod, "attr", step.attr, step.value)


def copy_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(module, memo)``, several times faster on plain module trees.

    Modules that customise copying or pickling (``__deepcopy__``, ``__getstate__``,
    ``__reduce_ex__``, slots, scripted modules) go through ``copy.deepcopy``; the rest are
    rebuilt from their ``__dict__`` the way deepcopy would, sharing ``memo`` so aliased
    modules and tensors stay aliased. The speed comes from skipping deepcopy's generic
    protocol lookups, each of which misses on ``nn.Module`` and raises internally."""
    memo = {} if memo is None else memo
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    if not _plain_module_class(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "_compiled_call_impl":
            continue
        if key == "_modules":
            state[key] = type(value)((k, None if m is None else copy_module(m, memo)) for k, m in value.items())
        elif key in ("_parameters", "_buffers"):  # deepcopy returns the memo's prepared copies
            state[key] = type(value)((k, copy.deepcopy(t, memo)) for k, t in value.items())
        else:
            state[key] = _copy_value(value, memo)
    new.__setstate__(state)  # as deepcopy does (modules fill in attributes added since)
    return new


_ATOMIC = frozenset({int, float, bool, str, complex, bytes, type(None), torch.dtype})


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    """deepcopy for one attribute, short-cutting immutable values and empty containers
    (a module's many hook dicts), which deepcopy would rebuild through its reduce protocol."""
    kind = type(value)
    if kind in _ATOMIC:
        return value
    if kind is tuple and all(type(v) in _ATOMIC for v in value):
        return value
    if kind is list and all(type(v) in _ATOMIC for v in value):
        return list(value)
    if kind in (dict, OrderedDict, set) and not value:
        return kind()
    return copy.deepcopy(value, memo)


@functools.cache
def _plain_module_class(cls: type) -> bool:
    """True when ``cls`` copies like ``nn.Module`` itself: no custom copy or pickle hooks
    besides ``__setstate__`` (which :func:`copy_module` calls, as deepcopy does)."""
    if issubclass(cls, torch.jit.ScriptModule) or any("__slots__" in vars(k) for k in cls.__mro__[:-1]):
        return False
    return all(getattr(cls, name) is getattr(nn.Module, name)
               for name in ("__getstate__", "__reduce_ex__", "__reduce__")) and \
        not hasattr(cls, "__deepcopy__")


def _tensor_memo(model: nn.Module, new: dict[int, Tensor]) -> dict[int, Any]:
    """A deepcopy memo holding the copy of every plain parameter and buffer: the sliced data
    for those the plan shrinks (never copied in full), a clone for the rest. Cloning here
    is several times cheaper than ``Tensor.__deepcopy__``; tensor subclasses are left to it."""
    memo: dict[int, Any] = {}
    for mod in unique_modules(model):
        for store, wrap in ((mod._parameters, True), (mod._buffers, False)):
            for t in store.values():
                if t is None or id(t) in memo or type(t) is not (nn.Parameter if wrap else Tensor):
                    continue
                data = new[id(t)] if id(t) in new else t.detach().clone()
                copy_ = nn.Parameter(data, requires_grad=t.requires_grad) if wrap else data
                if id(t) not in new and t.grad is not None:
                    copy_.grad = t.grad.clone()
                if t.__dict__:
                    copy_.__dict__.update(copy.deepcopy(t.__dict__, memo))
                memo[id(t)] = copy_
    return memo


def _sliced_tensors(model: nn.Module, plan: Slice) -> dict[int, Tensor]:
    """New data for every tensor the plan shrinks, keyed by id of the original tensor;
    checks the plan fits the model before anything changes."""
    new: dict[int, Tensor] = {}
    modules = dict(walk(model))
    index: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}  # a channel set slices many tensors
    for name, dims in plan.keep.items():
        t = get_tensor(model, name, modules)
        want = plan.shapes.get(name)
        if want is not None and list(t.shape) != list(want):
            raise PruningError(f"plan does not fit the model: '{name}' has shape {list(t.shape)}, plan expects {want}")
        data = t.detach()
        picks = []
        for dim, idx in sorted(dims.items()):
            if idx and max(idx) >= data.shape[dim]:
                raise PruningError(f"plan keeps index {max(idx)} of dim {dim} of '{name}' (size {data.shape[dim]})")
            key = (tuple(idx), data.device)
            if key not in index:
                index[key] = torch.as_tensor(idx, dtype=torch.long, device=data.device)
            picks.append((dim, index[key]))
        sliced = _select(data, picks)
        new[id(t)] = sliced if sliced is not t else sliced.clone()
    return new


_BIG = 1 << 22  # elements: a weight sliced along two dims above this is done in blocks


def _select(data: Tensor, picks: list[tuple[int, Tensor]]) -> Tensor:
    """``data`` indexed by ``index_select`` along each (dim, index) of ``picks``.

    A big weight sliced along two dims (a classifier's inputs and outputs) is gathered a
    block of the first dim at a time into the final tensor, so the half-sliced
    intermediate (hundreds of MB for a VGG classifier) never exists."""
    if len(picks) < 2 or data.numel() < _BIG:
        for dim, idx in picks:
            data = data.index_select(dim, idx)
        return data
    (d0, i0), rest = picks[0], picks[1:]
    shape = list(data.shape)
    for dim, idx in picks:
        shape[dim] = len(idx)
    out = data.new_empty(shape)
    step = max(1, _BIG // max(1, data.numel() // data.shape[d0]))
    for k in range(0, len(i0), step):
        blk = data.index_select(d0, i0[k:k + step])
        for dim, idx in rest:
            blk = blk.index_select(dim, idx)
        out.narrow(d0, k, blk.shape[d0]).copy_(blk)
    return out


def _check_result(model: nn.Module, plan: Slice) -> None:
    modules = dict(walk(model))
    for name, dims in plan.keep.items():
        t = get_tensor(model, name, modules)
        for dim, idx in dims.items():
            if t.shape[dim] != len(idx):
                raise PruningError(f"'{name}' dim {dim} has {t.shape[dim]} entries after slicing, expected {len(idx)}")


def _share_new_parameters(model: nn.Module) -> None:
    """Tied weights get one new Parameter object each (not one per alias)."""
    seen: dict[int, nn.Parameter] = {}
    for mod in unique_modules(model):
        for key, p in mod._parameters.items():
            if p is None:
                continue
            base = id(p.data.untyped_storage()) if p.numel() else id(p)
            if base in seen and seen[base] is not p and seen[base].shape == p.shape and seen[base].data_ptr() == p.data_ptr():
                mod._parameters[key] = seen[base]
            else:
                seen.setdefault(base, p)


def _snapshot_attrs(model: nn.Module) -> dict[int, dict[str, Any]]:
    """Per module id, what its handler's ``fix_attrs`` needs to know from before slicing."""
    snaps = {}
    for m in unique_modules(model):
        handler = handler_for(m)
        snap = handler.snapshot_attrs(m) if handler is not None else {}
        if snap:
            snaps[id(m)] = snap
    return snaps


def fix_module_attrs(model: nn.Module, old: dict[int, dict[str, Any]] | None = None, journal: Journal | None = None) -> list[AttrFix]:
    """Make standard modules' size attributes agree with their (sliced) tensors.

    Every module with a layer handler (:mod:`prunekit.handlers`: convolutions incl.
    depthwise/grouped, linear, batch/instance/group/layer/RMS norm, embedding, PReLU,
    multi-head attention, and registered custom layers) fixes its own attributes; ``old`` is
    :func:`_snapshot_attrs` taken before slicing. Changes go through ``journal``. Returns the
    changes made.
    """
    journal = journal if journal is not None else Journal()
    old = old or {}
    names: dict[int, str] = {}
    for n, m in walk(model):
        names.setdefault(id(m), n)
    changes: list[AttrFix] = []

    def put(mod: nn.Module, attr: str, value: Any) -> None:
        if getattr(mod, attr) != value:
            journal.set(mod, "attr", attr, value)
            changes.append(AttrFix(names.get(id(mod), "?"), attr, value))

    for mod in unique_modules(model):
        handler = handler_for(mod)
        if handler is not None:
            handler.fix_attrs(mod, put, old.get(id(mod)))
    return changes
