"""Turn a trace into coupled channel groups.

Atoms unioned during tracing form *channels* (connected components): a channel is the
smallest unit that can be removed, e.g. filter 5 of every conv feeding one residual sum,
or one attention head. Channels that share a producer form a *group* (a residual stage,
one conv's filters): the unit a pruning ratio applies to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from prunekit.graph.tracer import Member, TraceState, is_ignore_reason
from prunekit.graph.unionfind import UnionFind


@dataclass(frozen=True)
class GroupMember:
    """One parameter/buffer dim touched by a group: ``channel[i]`` is the group-local channel
    of index ``i`` (-1 where the index belongs to another group or to no prunable channel)."""

    tensor: str
    dim: int
    role: str
    channel: np.ndarray = field(compare=False, repr=False)


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels: removing local channel ``c`` removes it from every member.

    ``prunable[c]`` is False for channels that must stay; ``reasons[c]`` says why.
    """

    index: int
    name: str
    channels: np.ndarray = field(repr=False)  # component id of each local channel
    prunable: np.ndarray = field(repr=False)
    reasons: tuple[str, ...] = field(repr=False)
    members: tuple[GroupMember, ...] = field(repr=False)
    # Local channels of each producing layer in the group: each must keep some channels.
    producers: tuple[np.ndarray, ...] = field(default=(), repr=False)

    @property
    def size(self) -> int:
        """Number of channels in the group."""
        return int(len(self.channels))

    @property
    def n_prunable(self) -> int:
        """Number of channels that may be removed."""
        return int(self.prunable.sum())

    def modules(self) -> list[str]:
        """Names of the modules whose parameters this group slices, in trace order."""
        seen: dict[str, None] = {}
        for m in self.members:
            seen.setdefault(m.tensor.rsplit(".", 1)[0] if "." in m.tensor else m.tensor, None)
        return list(seen)


def components(state: TraceState) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Connected components of atoms under all recorded unions, plus the implied
    member-sharing unions (a tensor dim seen twice, e.g. a module reused or traced in two
    modes, must be sliced once). Returns (component id per atom, extra unions)."""
    n = state.n_atoms + 1
    extra: list[tuple[np.ndarray, np.ndarray]] = []
    first: dict[tuple[str, int], Member] = {}
    for m in state.members:
        key = (m.tensor, m.dim)
        if key in first:
            a, b = first[key].atoms, m.atoms
            both = (a != 0) & (b != 0)
            extra.append((a[both], b[both]))
        else:
            first[key] = m
    pairs = state.unions + extra
    if pairs:
        rows = np.concatenate([p[0] for p in pairs])
        cols = np.concatenate([p[1] for p in pairs])
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    return comp.astype(np.int64), extra


def apply_grid_ties(comp: np.ndarray, grids: list[np.ndarray]) -> np.ndarray:
    """Make every grid's kept set a product set.

    A label that varies along two or more dims (channels split into heads, a channel
    shuffle, a class token row) can only lose whole slices along one axis. For each grid we
    tie the channels across the other axes, choosing the axis that leaves the most channels.
    """
    uf = UnionFind(int(comp.max()) + 1 if len(comp) else 1)
    for grid in grids:
        cells = np.where(grid != 0, comp[grid], -1)
        best: tuple[np.ndarray, np.ndarray] | None = None
        best_count = -1
        for axis in range(cells.ndim):
            moved = np.moveaxis(cells, axis, 0).reshape(cells.shape[axis], -1)
            rep = moved.max(axis=1, keepdims=True)
            ok = moved >= 0
            a, b = np.broadcast_to(rep, moved.shape)[ok], moved[ok]
            trial = uf.copy()
            trial.union(a, b)
            count = len(np.unique(trial.find(cells[cells >= 0])))
            if count > best_count:
                best, best_count = (a, b), count
        if best is not None:
            uf.union(*best)
    return uf.find(comp)


def join_shared_scales(comp: np.ndarray, scales: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``comp`` with each broadcast per-channel operand's atom joined to the channel it scales,
    where that is one channel: ``gamma[c]`` over channel ``c`` of two token sets that the
    residual add couples anyway becomes a member (sliced with ``c``); ``cos[j]`` over dim
    ``j`` of every attention head, which no op couples, is left alone (heads stay separable,
    as before). ``scales``: (operand atoms, other atoms at the same positions) pairs."""
    if not scales:
        return comp
    uf = UnionFind(int(comp.max()) + 1)
    for a, b in scales:
        if not len(a):
            continue
        pairs = np.unique(np.stack([comp[a], comp[b]], axis=1), axis=0)
        ids, counts = np.unique(pairs[:, 0], return_counts=True)
        one = np.isin(pairs[:, 0], ids[counts == 1])
        uf.union(pairs[one, 0], pairs[one, 1])
    return uf.find(comp)


def build_groups(state: TraceState, model: nn.Module) -> tuple[list[ChannelGroup], np.ndarray, list[Member]]:
    """Compute channels and groups from a trace.

    Returns (groups, component id per atom (-1 for none), every member incl. derived ones).
    """
    comp, _ = components(state)
    comp = join_shared_scales(comp, state.shared_scales)
    comp = apply_grid_ties(comp, list(state.grids.values()))
    comp[0] = -1
    n_comp = int(comp.max()) + 1
    members = _param_members(state, comp, model)
    # A channel is prunable only if some real layer produces it and nothing blocks it.
    active_sources = [s for s in state.sources if s.active]
    active = np.zeros(n_comp, dtype=bool)
    for s in active_sources:
        active[comp[s.start:s.stop]] = True
    blocked = state.blocked + _param_size_blocks(state, members)
    reasons = [why for _, why in blocked]
    reason_of = np.full(n_comp, -1, dtype=np.int64)  # first blocking reason of each channel
    for k, (atoms, _) in enumerate(blocked):
        cs = comp[atoms]
        cs = cs[cs >= 0]
        reason_of[cs[reason_of[cs] < 0]] = k
    # Channels sharing a producer form one group.
    guf = UnionFind(n_comp)
    for s in active_sources:
        cs = comp[s.start:s.stop]
        cs = cs[cs >= 0]
        if len(cs) > 1:
            guf.union(np.full(len(cs), cs[0]), cs)
    uniq, first = np.unique(comp[1:], return_index=True)
    ordered = uniq[np.argsort(first)]
    ordered = ordered[(ordered >= 0)]
    ordered = ordered[active[ordered]]
    # Groups in order of their first channel, channels in trace order within each group.
    roots = guf.find(ordered)
    _, first_of_root, which = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(first_of_root), dtype=np.int64)
    rank[np.argsort(first_of_root, kind="stable")] = np.arange(len(first_of_root))
    gid = rank[which]
    by_group = np.argsort(gid, kind="stable")
    bounds = np.searchsorted(gid[by_group], np.arange(len(first_of_root) + 1))
    group_chans = [ordered[by_group[bounds[i]:bounds[i + 1]]] for i in range(len(first_of_root))]
    group_of = np.full(n_comp + 1, -1, dtype=np.int64)  # last slot: atom 0 / untracked
    local_of = np.full(n_comp + 1, -1, dtype=np.int64)
    for gi, chans in enumerate(group_chans):
        group_of[chans] = gi
        local_of[chans] = np.arange(len(chans))
    per_group: list[list[GroupMember]] = [[] for _ in group_chans]
    seen: set[tuple[str, int]] = set()
    for m in members:
        key = (m.tensor, m.dim)
        if key in seen:
            continue
        seen.add(key)
        cids = np.where(m.atoms != 0, comp[m.atoms], -1)
        g = group_of[cids]
        for gi in _present(g):
            per_group[int(gi)].append(GroupMember(m.tensor, m.dim, m.role, np.where(g == gi, local_of[cids], -1)))
    producers: list[list[np.ndarray]] = [[] for _ in group_chans]
    for s in active_sources:
        cids = np.unique(comp[s.start:s.stop])
        cids = cids[cids >= 0]
        gids = group_of[cids]
        for gi in _present(gids):
            producers[int(gi)].append(np.sort(local_of[cids[gids == gi]]))
    groups: list[ChannelGroup] = []
    for chans, gm, prods in zip(group_chans, per_group, producers):
        if not gm:
            continue
        why = reason_of[chans]
        group_reasons = tuple(reasons[k] if k >= 0 else "" for k in why.tolist())
        groups.append(ChannelGroup(len(groups), _group_name(gm), chans.astype(np.int64), why < 0,
                                   group_reasons, tuple(gm), tuple(prods)))
    return groups, comp, members


def group_ties(state: TraceState, comp: np.ndarray, groups: list[ChannelGroup]) -> list[tuple[int, ...]]:
    """Classes of groups (indices into ``groups``) that must keep the same fraction of their
    channels: a reshape sized with a count read from another tensor (``x.reshape(B, N, C)``
    after attention, ``qkv.reshape(B, N, 3, heads, C // heads)``) stays valid after pruning
    only if the channels on both sides shrink alike. Each side must hold every channel of its
    groups equally often (then kept positions are proportional to kept channels); a tie that
    does not is left to validation."""
    group_of = np.full(int(comp.max()) + 2, -1, dtype=np.int64)  # index -1: atom 0 / no channel
    for g in groups:
        group_of[g.channels] = g.index
    uf = UnionFind(len(groups))
    for rows, lab, _where in state.size_ties:
        sides = [_tie_side(a, comp, group_of, groups) for a in (rows, lab)]
        if sides[0] is None or sides[1] is None:
            continue
        members = np.array(sorted(sides[0] | sides[1]), dtype=np.int64)
        if len(members) > 1:
            uf.union(np.full(len(members) - 1, members[0]), members[1:])
    roots = uf.find(np.arange(len(groups))) if groups else np.zeros(0, dtype=np.int64)
    classes: dict[int, list[int]] = {}
    for i, r in enumerate(roots.tolist()):
        classes.setdefault(r, []).append(i)
    return [tuple(c) for c in classes.values() if len(c) > 1]


def _tie_side(atoms: np.ndarray, comp: np.ndarray, group_of: np.ndarray,
              groups: list[ChannelGroup]) -> set[int] | None:
    """The groups whose channels ``atoms`` hold, when each of them appears whole and every
    channel of a group equally often; None otherwise."""
    cells = comp[atoms[atoms != 0]]
    chans, counts = np.unique(cells[cells >= 0], return_counts=True)
    gids = group_of[chans]
    out = set()
    for gi in np.unique(gids[gids >= 0]).tolist():
        mine = gids == gi
        if mine.sum() != groups[gi].size or counts[mine].min() != counts[mine].max():
            return None
        out.add(gi)
    return out


def _present(gids: np.ndarray) -> np.ndarray:
    """The distinct group ids (>= 0) in ``gids``; most members and producers touch a single
    group, which a min/max check finds without sorting."""
    valid = gids[gids >= 0]
    if len(valid) and valid.min() == valid.max():
        return valid[:1]
    return np.unique(valid)


def _param_members(state: TraceState, comp: np.ndarray, model: nn.Module) -> list[Member]:
    """Members recorded by rules plus those derived from raw parameters' element labels.

    An element no op joined with anything (its atom alone in its component: a row of a
    relative-position table the clipped window never gathers) holds no channel and may sit
    anywhere: slicing the parameter along the channels' dim removes it harmlessly."""
    out = list(state.members)
    sizes = np.bincount(comp[comp >= 0]) if (comp >= 0).any() else np.zeros(0, dtype=np.int64)
    for name, atoms in state.param_elems:
        cells = comp[atoms.numpy()]
        if cells.ndim == 0:
            continue
        free = (cells < 0) | (sizes[np.maximum(cells, 0)] == 1)
        if free.all():
            continue
        for d in range(cells.ndim):
            moved = np.moveaxis(cells, d, 0).reshape(cells.shape[d], -1)
            loose = np.moveaxis(free, d, 0).reshape(cells.shape[d], -1)
            first = np.argmax(~loose, axis=1)  # a joined element of each position (0 if none)
            rep_cell = moved[np.arange(len(moved)), first]
            used = ~loose.all(axis=1)
            if (cells.shape[d] > 1 and ((moved == rep_cell[:, None]) | loose).all()
                    and len(np.unique(rep_cell[used])) > 1):
                # Constant along every other dim: the parameter is sliced along d.
                rep = np.moveaxis(atoms.numpy(), d, 0).reshape(cells.shape[d], -1)[np.arange(len(moved)), first]
                out.append(Member(name, d, rep.astype(np.int64), "norm"))
                break
        else:
            if len(np.unique(cells[~free])) > 1:
                state.blocked.append((np.unique(atoms.numpy()), f"parameter '{name}' couples channels along several dims"))
    return out


def _param_size_blocks(state: TraceState, members: list[Member]) -> list[tuple[np.ndarray, str]]:
    """The channels of parameter dims whose size the forward used as a value (see
    :meth:`prunekit.graph.tracer.Tracer.size_used_as_value`), with the reason."""
    out = []
    for name, dim, reason in state.param_size_values:
        atoms = [m.atoms[m.atoms != 0] for m in members if m.tensor == name and m.dim == dim]
        if atoms:
            out.append((np.unique(np.concatenate(atoms)), reason))
    return out


def _group_name(members: list[GroupMember]) -> str:
    outs = [m.tensor.rsplit(".", 1)[0] for m in members if m.role == "out"]
    names = list(dict.fromkeys(outs)) or [members[0].tensor.rsplit(".", 1)[0]]
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} coupled)"


def describe(groups: list[ChannelGroup], limit: int = 40) -> str:
    """Readable summary of groups: sizes, prunable counts, members and blocking reasons."""
    lines = [f"DependencyGraph: {len(groups)} groups, {sum(g.size for g in groups)} channels, "
             f"{sum(g.n_prunable for g in groups)} prunable"]
    for g in groups[:limit]:
        mods = g.modules()
        shown = ", ".join(mods[:4]) + (f", ... (+{len(mods) - 4})" if len(mods) > 4 else "")
        lines.append(f"  [{g.index}] {g.name}: {g.size} channels, {g.n_prunable} prunable | {shown}")
        why = sorted({r for r in g.reasons if r})
        for r in why[:2]:
            lines.append(f"       unprunable: {r}")
    if len(groups) > limit:
        lines.append(f"  ... {len(groups) - limit} more groups")
    return "\n".join(lines)


def summarize_unprunable(groups: list[ChannelGroup]) -> dict[str, Any]:
    """Map each group name with blocked channels to the distinct reasons."""
    return {g.name: sorted({r for r in g.reasons if r}) for g in groups if g.n_prunable < g.size}


def unprunable_cost(groups: list[ChannelGroup], shapes: dict[str, tuple[int, ...]], top: int = 5) -> dict[str, Any]:
    """How much of a model the unprunable channels of ``groups`` hold: ``params_share``, the
    fraction of the parameters (``shapes``: name -> shape of every parameter) that touch a
    channel which must stay (an element is counted once, whichever of its indices is
    blocked), and ``reasons``, the ``top`` reasons by that share, each with its channel count
    and groups. Empty reasons and a share of 0 when every channel is prunable."""
    total = sum(int(np.prod(sh)) for sh in shapes.values())
    by_reason: dict[str, dict[tuple[str, int], set[int]]] = {}
    channels: dict[str, int] = {}
    names: dict[str, list[str]] = {}
    every: dict[tuple[str, int], set[int]] = {}
    for g in groups:
        stuck = np.flatnonzero(~g.prunable)
        if not len(stuck):
            continue
        why_of = np.array([r or "unprunable" for r in g.reasons], dtype=object)
        for why, count in zip(*np.unique(why_of[stuck], return_counts=True)):
            channels[why] = channels.get(why, 0) + int(count)
            if g.name not in names.setdefault(why, []):
                names[why].append(g.name)
        for m in g.members:
            if m.tensor not in shapes:
                continue  # a buffer: no parameters
            pos = np.flatnonzero(m.channel >= 0)
            pos = pos[~g.prunable[m.channel[pos]]]
            key = (m.tensor, m.dim)
            every.setdefault(key, set()).update(pos.tolist())
            for why in set(why_of[m.channel[pos]].tolist()):
                at = pos[why_of[m.channel[pos]] == why]
                by_reason.setdefault(why, {}).setdefault(key, set()).update(at.tolist())

    def held(blocked: dict[tuple[str, int], set[int]]) -> int:
        # Elements with no blocked index along any dim are free: the rest are held.
        free: dict[str, int] = {}
        for (name, dim), idx in blocked.items():
            sh = shapes[name]
            free.setdefault(name, int(np.prod(sh)))
            free[name] = free[name] * (sh[dim] - len(idx)) // sh[dim] if sh[dim] else 0
        return sum(int(np.prod(shapes[n])) - f for n, f in free.items())

    reasons = [{"reason": why, "channels": channels[why], "groups": names[why], "ignored": is_ignore_reason(why),
                "params_share": held(by_reason.get(why, {})) / max(1, total)} for why in channels]
    reasons.sort(key=lambda r: (-r["params_share"], -r["channels"]))
    return {"params_share": held(every) / max(1, total), "reasons": reasons[:top]}
