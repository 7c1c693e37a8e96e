"""Plan building, in one place: from the channels to remove (local indices per group) to a
plan with its attribute fixes, the op output shapes the pruned model must produce, and,
when validation finds a mismatch, the groups to blame.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit._perf import named_tensors
from prunekit.graph import DependencyGraph, OpRecord
from prunekit.graph.dependency import ChannelGroup
from prunekit.graph.provenance import AttrInt
from prunekit.graph.sizes import quotient_kept
from prunekit.plan import AttrFix, PruningPlan, Slice
from prunekit.surgery.replace import replacement_steps
from prunekit.surgery.validate import Mismatch, Shapes

__all__ = ["blame", "changed_quotients", "channel_plan", "expected_shapes", "mixed_ops", "quotient_groups",
           "removed_atoms", "removed_channels"]


def channel_plan(model: nn.Module, graph: DependencyGraph, removed: list[np.ndarray],
                 meta: dict[str, Any] | None = None) -> tuple[PruningPlan, dict[str, Shapes]]:
    """The plan removing ``removed`` (local channels per group of ``graph.groups``): one
    Slice step, its attribute fixes and the Replace steps of modules whose class cannot run
    their sliced tensors (:func:`~prunekit.surgery.replace.replacement_steps`); and the op
    output shapes the pruned model must produce, per traced mode (empty for an empty plan)."""
    gone = removed_atoms(graph, removed)
    base = make_slice(model, graph, gone)
    if not base.keep:
        return PruningPlan((), dict(meta or {})), {}
    expected = expected_shapes(graph, gone)
    fixes = attribute_fixes(model, graph, expected)
    group_fixes, notes = depthwise_group_fixes(model, graph, expected)
    meta = dict(meta or {})
    if notes:
        meta["inferred_attrs"] = notes
    inexact = mixed_ops(graph, gone)
    if inexact:
        meta["inexact"] = inexact
    return PruningPlan((base, *fixes, *group_fixes, *replacement_steps(model, base)), meta), expected


def mixed_ops(graph: DependencyGraph, gone: Tensor) -> list[str]:
    """The ops (normalisations, softmaxes over channels) that combine a removed channel with
    kept ones: there the pruned model computes something other than the original with those
    channels silenced, so the prune is not exact (fine-tuning recovers it). Empty when the
    prune is exact. Goes to ``plan.meta["inexact"]``."""
    g = gone.numpy()
    out: list[str] = []
    for atoms, what in graph.state.mixing:
        if g[atoms].any() and what not in out:
            out.append(what)
    return out


def changed_quotients(graph: DependencyGraph, removed: list[np.ndarray],
                      attrs: Iterable[AttrFix]) -> list[tuple[np.ndarray, str]]:
    """The sizes divided by a module attribute and used as values (``q * (C // num_heads) **
    -0.5``, recorded while tracing) whose value the prune of ``removed`` (local channels per
    group), with attribute fixes ``attrs``, would change: (the atoms that must stay so the
    size keeps its value, the reason). Empty when every such value survives, as it does when
    whole heads go with their share of the embedding."""
    if not graph.state.quotients:
        return []
    gone = removed_atoms(graph, removed).numpy()
    fixed = {(f.module, f.attr): f.value for f in attrs}
    out: list[tuple[np.ndarray, str]] = []
    for tag, reason in graph.state.quotients:
        divisor: AttrInt = tag.per[0]
        new = fixed.get((divisor.module, divisor.attr))
        if new is not None and divisor.index is not None:
            new = new[divisor.index]
        value = int(divisor) if new is None else divisor.evaluate(new)
        if not quotient_kept(tag, gone, value) and all(reason != r for _, r in out):
            attr = f"{divisor.module}.{divisor.attr}" if divisor.module else divisor.attr
            out.append((np.unique(tag.keep), f"{reason}, and this prune changes its quotient by '{attr}'"))
    return out


def quotient_groups(graph: DependencyGraph, groups: list[Any], removed: list[np.ndarray],
                    atoms: np.ndarray) -> list[int]:
    """Indices of the groups to keep whole so that a quotient counting ``atoms`` keeps its
    value: the groups removing some of those atoms' channels, else (only the divisor, a head
    count, changed) the groups tied to the atoms' groups (``graph.ties``) that remove some."""
    channels = set(graph.comp[atoms].tolist())
    owners = [i for i, g in enumerate(groups) if channels.intersection(g.channels.tolist())]
    hit = [i for i in owners if len(removed[i])]
    if hit:
        return hit
    tied = {j for tie in graph.ties if set(tie) & set(owners) for j in tie}
    return sorted(i for i in tied if len(removed[i]))


def removed_channels(groups: list[ChannelGroup], plan: PruningPlan) -> list[np.ndarray]:
    """The inverse of :func:`channel_plan`: the local channels of each of ``groups`` (a traced
    graph's) that ``plan`` (a channel plan of that model) removes, read off the kept indices of
    the groups' members (a channel is removed where a member's slice drops its index)."""
    keep = plan.keep
    out = []
    for g in groups:
        gone = np.zeros(g.size, dtype=bool)
        for m in g.members:
            kept = keep.get(m.tensor, {}).get(m.dim)
            if kept is None:
                continue
            dropped = np.ones(len(m.channel), dtype=bool)
            dropped[np.asarray(kept, dtype=np.int64)] = False
            chans = m.channel[dropped]
            gone[chans[chans >= 0]] = True
        out.append(np.flatnonzero(gone))
    return out


def blame(graph: DependencyGraph, groups: list[Any], removed: list[np.ndarray], mismatch: Mismatch) -> list[int]:
    """Indices of the groups to keep whole after a validation failure, searched from narrow
    to wide: the failing op's own channels, then every op of its module, then of its parent
    module. (A size computed from an input's shape, e.g. ``C // num_heads``, is only visible
    there.)"""
    ops = graph.ops(mismatch.mode)
    module = mismatch.op.module
    parent = module.rpartition(".")[0]
    scopes = [[mismatch.op], [op for op in ops if op.module == module],
              [op for op in ops if op.module == parent or op.module.startswith(parent + ".")] if parent else ops]
    for scope in scopes:
        touched = graph.channels_of(scope)
        hit = [i for i, (g, r) in enumerate(zip(groups, removed)) if len(r) and touched.intersection(g.channels[r].tolist())]
        if hit:
            return hit
    return []


def removed_atoms(graph: DependencyGraph, removed: list[np.ndarray]) -> Tensor:
    """Bool tensor over atoms: True where the atom's channel is removed, or where the atom is
    an element of a parameter that loses the element's index along some dim."""
    n_comp = int(graph.comp.max()) + 1
    gone = np.zeros(n_comp + 1, dtype=bool)
    for g, idx in zip(graph.groups, removed):
        gone[g.channels[idx]] = True
    out = gone[graph.comp]
    _elements_gone(graph, out)
    return torch.from_numpy(out)


def _elements_gone(graph: DependencyGraph, gone: np.ndarray) -> None:
    """Mark the element atoms of every traced parameter that loses a row or column: a weight
    computed from it in forward (``w.to(dtype)``) shrinks with it, and its ops' predicted
    shapes must say so. (Where a parameter's elements joined a channel, this changes nothing.)"""
    by_tensor: dict[str, list[Any]] = {}
    for m in graph.members:
        by_tensor.setdefault(m.tensor, []).append(m)
    for name, atoms in graph.state.param_elems:
        a = atoms.numpy()
        mask = np.zeros(a.shape, dtype=bool)
        for m in by_tensor.get(name, ()):
            if m.dim < a.ndim and len(m.atoms) == a.shape[m.dim]:
                shape = [1] * a.ndim
                shape[m.dim] = -1
                mask |= ((m.atoms != 0) & gone[m.atoms]).reshape(shape)
        if mask.any():
            gone[a[mask]] = True


def make_slice(model: nn.Module, graph: DependencyGraph, gone: Tensor) -> Slice:
    """Kept indices for every tensor dim that loses channels (the plan's Slice step)."""
    keep: dict[str, dict[int, list[int]]] = {}
    shapes: dict[str, list[int]] = {}
    tensors = {name: t for name, _, _, t in named_tensors(model)}
    done: set[tuple[str, int]] = set()
    g = gone.numpy()
    for m in graph.members:
        key = (m.tensor, m.dim)
        if key in done:
            continue
        done.add(key)
        kept = (m.atoms == 0) | ~g[m.atoms]
        if not kept.all():
            keep.setdefault(m.tensor, {})[m.dim] = np.flatnonzero(kept).tolist()
            shapes[m.tensor] = list(tensors[m.tensor].shape)
    return Slice(keep, shapes)


def expected_shapes(graph: DependencyGraph, gone: Tensor) -> dict[str, Shapes]:
    """Output shapes of every recorded op after pruning, per traced mode."""
    result: dict[str, Shapes] = {}
    gone_np = gone.numpy()
    kept: dict[int, list[int | None]] = {}  # id(label) -> kept count per dim (ops share labels)
    for mode, ops in graph.state.ops.items():
        result[mode] = [[_new_shape(s, lab, gone_np, kept) for s, lab in zip(op.out_shapes, op.out_labs)]
                        for op in ops]
    return result


def _new_shape(shape: tuple[int, ...], lab: Tensor, gone: np.ndarray, cache: dict[int, list[int | None]]) -> tuple[int, ...]:
    if lab.ndim != len(shape):
        return shape
    counts = cache.get(id(lab))
    if counts is None:
        a = lab.numpy()
        counts = [None] * a.ndim
        for d in range(a.ndim if a.size else 0):  # an empty label tells no channel apart: sizes stay
            if a.shape[d] > 1:
                # A position survives if any element of its slice is untracked or kept.
                moved = np.moveaxis(a, d, 0).reshape(a.shape[d], -1)
                counts[d] = int((~(gone[moved] & (moved != 0)).all(axis=1)).sum())
        cache[id(lab)] = counts
    return tuple(s if c is None else c for s, c in zip(shape, counts))


def attribute_fixes(model: nn.Module, graph: DependencyGraph, expected: dict[str, Shapes]) -> list[AttrFix]:
    """Module attributes that hold a size an op was called with and that must change.

    For view/reshape/expand/unflatten targets, split sizes and layer-norm shapes whose value
    changes, the size's provenance (recorded while tracing, see :mod:`prunekit.graph.provenance`)
    names the attribute it was computed from (``num_heads``, ``split_size``, ``expand_chs //
    2``, an entry of a ``split_sizes`` list); that attribute is solved for the new size. A
    size read from a tensor's shape follows the pruned tensors by itself and names none, and
    an attribute is never chosen because its value happens to equal a changed size. Sizes
    hard-coded in the code are caught by validation. Two ops asking one attribute for
    different values leave it alone (validation then finds the op that breaks).
    """
    wanted: dict[tuple[str, str, int | None], int] = {}  # (module, attribute, list entry or None) -> value
    conflict: set[tuple[str, str]] = set()
    for mode, ops in graph.state.ops.items():
        for op, new in zip(ops, expected[mode]):
            for old_val, new_val in _changed_args(op, new):
                if not isinstance(old_val, AttrInt):
                    continue  # a literal or a size read from a tensor: nothing to rewrite
                solved = old_val.solve(new_val)
                key = (old_val.module, old_val.attr, old_val.index)
                if solved is None or wanted.setdefault(key, solved) != solved:
                    conflict.add(key[:2])
    fixes: dict[tuple[str, str], Any] = {}
    for (module, attr, index), value in wanted.items():
        if (module, attr) in conflict:
            continue
        if index is None:
            fixes[(module, attr)] = value
            continue
        base = fixes.get((module, attr), _attr_value(model, module, attr))
        if not isinstance(base, (list, tuple)) or index >= len(base):
            continue
        fixes[(module, attr)] = type(base)(value if i == index else v for i, v in enumerate(base))
    return [AttrFix(m, a, v) for (m, a), v in fixes.items()]


def _attr_value(model: nn.Module, module: str, attr: str) -> Any:
    """Current value of ``module.attr`` in ``model`` (None if there is none)."""
    try:
        mod = model.get_submodule(module) if module else model
    except AttributeError:
        return None
    return getattr(mod, attr, None)


_DEPTHWISE_OPS = ("conv1d", "conv2d", "conv3d")


def depthwise_group_fixes(model: nn.Module, graph: DependencyGraph,
                          expected: dict[str, Shapes]) -> tuple[list[AttrFix], list[str]]:
    """Fixes of module attributes passed as ``groups`` to a functional depthwise conv
    (``F.conv2d(x, self.filt, groups=self.channels)``, a blur pool), and a note per fix.

    What the argument means comes from the op: a depthwise conv's ``groups`` is its input
    channel count (the traced ``groups`` equals it), so it must follow the pruned count.
    Which attribute supplied it is its recorded provenance (:mod:`prunekit.graph.provenance`),
    never one of a module with a layer handler (``nn.Conv2d`` fixes its own ``groups``);
    each such fix is noted (``plan.meta["inferred_attrs"]``). A ``groups`` computed from the
    input's shape names no attribute and needs no fix; one hard-coded is left to
    validation, which then keeps the group whole."""
    from prunekit.handlers import handler_for

    fixes: dict[tuple[str, str], Any] = {}
    notes: list[str] = []
    for mode, ops in graph.state.ops.items():
        for op, new in zip(ops, expected[mode]):
            if op.name not in _DEPTHWISE_OPS or not op.in_shapes or len(op.in_shapes[0]) < 2:
                continue
            groups = op.args[6] if len(op.args) > 6 else op.kwargs.get("groups", 1)
            c_in, c_out, new_out = op.in_shapes[0][1], op.out_shapes[0][1], new[0][1]
            if not isinstance(groups, AttrInt) or groups < 2 or groups != c_in or c_out % c_in or new_out == c_out:
                continue
            try:
                owner = model.get_submodule(groups.module) if groups.module else model
            except AttributeError:
                continue
            value = groups.solve(new_out * int(groups) // c_out)
            key = (groups.module, groups.attr)
            if handler_for(owner) is not None or value is None or groups.index is not None or key in fixes:
                continue
            fixes[key] = value
            notes.append(f"{groups.module + '.' if groups.module else ''}{groups.attr}: {int(groups)} -> {value} "
                         f"(the groups of depthwise '{op.name}' in '{op.module}', computed from this attribute)")
    return [AttrFix(m, a, v) for (m, a), v in fixes.items()], notes


def _target(args: tuple[Any, ...], start: int) -> list[Any]:
    rest = list(args[start:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0])
    return rest


def _changed_args(op: OpRecord, new: list[tuple[int, ...]]) -> list[tuple[Any, int]]:
    """``(size argument as recorded, its new value)`` for each int size argument of ``op``
    whose value pruning changes (one pair per list entry for split sizes and norm shapes)."""
    old = op.out_shapes
    if old == new:
        return []
    out: list[tuple[Any, int]] = []
    if op.name in ("view", "reshape", "expand", "broadcast_to"):
        target = _target(op.args, 1)
        for d, v in enumerate(target):
            if isinstance(v, int) and not isinstance(v, bool) and v != -1 and d < len(new[0]) and old[0][d] != new[0][d]:
                out.append((v, new[0][d]))
    elif op.name == "unflatten":
        dim, sizes = op.args[1], op.args[2]
        for k, v in enumerate(sizes):
            d = dim % len(old[0]) + k
            if v != -1 and old[0][d] != new[0][d]:
                out.append((v, new[0][d]))
    elif op.name in ("split", "split_with_sizes"):
        sizes = op.args[1] if len(op.args) > 1 else op.kwargs.get("split_size_or_sections")
        dim = op.args[2] if len(op.args) > 2 else op.kwargs.get("dim", 0)
        new_sizes = [s[dim] for s in new]
        if isinstance(sizes, (list, tuple)):
            out.extend((v, n) for v, n in zip(sizes, new_sizes) if v != n)
        elif isinstance(sizes, int) and len(set(new_sizes[:-1] or new_sizes)) == 1 and new_sizes[0] != sizes:
            out.append((sizes, new_sizes[0]))
    elif op.name in ("layer_norm", "rms_norm"):
        shape = op.args[1]
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        out.extend((v, n) for v, n in zip(shape, new[0][-len(shape):]) if v != n)
    return out
