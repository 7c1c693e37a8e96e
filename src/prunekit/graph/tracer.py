"""Run a model once under a ``TorchFunctionMode`` and record how channels flow.

The tracer executes the real forward pass (so any Python control flow, dynamic shapes and
training-only branches just work) and, for every torch function call, applies a channel
*rule* from :mod:`prunekit.graph.rules`. Rules create atoms (new output channels of conv /
linear / embedding), union atoms that must be pruned together (residual add, attention
contraction, grouped-conv blocks), attach parameter slices (*members*) to atoms, and block
atoms that cannot be pruned, always with a reason that names the op and module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from prunekit._perf import named_tensors, unique_modules, walk
from prunekit.graph.labels import compact, zeros_like_shape
from prunekit.graph.meta import MetaStandIns, meta_shortcut, meta_tensors, to_meta
from prunekit.graph.provenance import ShapeInt, mark_attributes
from prunekit.graph.sizes import SizeFloat, SizeInt, SizeTag, Tags, float_listener, merge, tagged, tags_of, value_uses
from prunekit.graph.unionfind import UnionFind
from prunekit.runtime import call, inputs_for, model_mode


@dataclass
class Member:
    """One prunable dim of a parameter or buffer: ``atoms[i]`` is the atom of index ``i``."""

    tensor: str
    dim: int
    atoms: np.ndarray
    role: str  # "out" (a producer's filters), "in" (a consumer's inputs), "norm" (per-channel)


class NeedsRealTensors(Exception):
    """Raised during a meta-device trace when a rule needs tensor *values* (an index
    tensor), which meta tensors do not have: the trace is then redone with real tensors."""


SIZE_ARG_OPS = frozenset({"view", "reshape", "expand", "broadcast_to", "unflatten", "split", "split_with_sizes",
                          "layer_norm", "rms_norm", "conv1d", "conv2d", "conv3d"})
"""Ops whose non-tensor arguments hold sizes that pruning may have to rewrite (the only
ones whose arguments an :class:`OpRecord` keeps; a depthwise conv's ``groups``)."""


WEIGHTED_OPS = frozenset({"conv1d", "conv2d", "conv3d", "linear", "matmul", "bmm", "mm", "addmm", "baddbmm",
                          "scaled_dot_product_attention", "multi_head_attention_forward"})
"""Ops whose tensor inputs' shapes an :class:`OpRecord` keeps (``in_shapes``): enough to
count their multiply-adds (a weight's shape, a contracted dim)."""


@dataclass
class OpRecord:
    """One recorded torch call: enough to predict its output shapes after pruning
    (``args``/``kwargs``: the non-tensor arguments, kept for :data:`SIZE_ARG_OPS` only),
    and the dataflow between calls: ``in_values``/``out_values`` are the value ids (small
    ints, unique within one traced pass) of its tensor inputs and outputs, -1 for an input
    no recorded op produced (a parameter, a buffer); ``in_shapes`` the input shapes, kept
    for :data:`WEIGHTED_OPS` only."""

    index: int
    name: str
    module: str
    out_shapes: list[tuple[int, ...]]
    out_labs: list[Tensor]
    in_labs: list[Tensor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    in_values: list[int] = field(default_factory=list)
    out_values: list[int] = field(default_factory=list)
    in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    data_dependent: bool = False  # its output shapes depend on input *values* (see data_dependent)
    aux_labs: dict[str, Tensor] = field(default_factory=dict)
    """Labels of channels the op makes and uses inside, which no tensor carries (an attention
    op's q/k/v inner channels, ``"inner"``): what its cost depends on besides its inputs and outputs."""


VALUE_SHAPED_OPS = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "unique_dim",
                              "torchvision::nms", "torchvision::batched_nms", "bincount", "histc"})
"""Ops whose output shapes depend on their input values (how many boxes survive NMS,
which elements are non-zero); see :func:`data_dependent`."""


def data_dependent(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], ins: list[Tensor]) -> bool:
    """Whether the output shapes of this call depend on tensor *values*, not only on the
    input shapes: the ops of :data:`VALUE_SHAPED_OPS`, ``where(cond)`` with one argument,
    indexing with a boolean mask, ``repeat_interleave`` with tensor repeats. Validation
    compares such shapes (and those computed from them) on their channel dims only."""
    if name in VALUE_SHAPED_OPS:
        return True
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name in ("getitem", "index"):
        index = args[1] if len(args) > 1 else kwargs.get("indices", kwargs.get("index"))
        return any(t.dtype == torch.bool for t in tensors_in(index))
    if name == "repeat_interleave":
        return any(isinstance(a, Tensor) for a in args[1:2]) or isinstance(kwargs.get("repeats"), Tensor)
    return False


@dataclass
class ModuleCall:
    """One module's forward call in a traced pass: its qualified name, the value ids of its
    positional tensor inputs and of its outputs, the recorded ops it ran (``first_op`` to
    ``last_op`` inclusive; none when ``last_op < first_op``), the index of the call it ran
    in (-1 for the root call) and the end of its nested calls (calls ``index+1 .. stop-1``)."""

    index: int
    name: str
    parent: int
    in_values: list[int]
    first_op: int
    out_values: list[int] = field(default_factory=list)
    last_op: int = -1
    stop: int = -1


@dataclass
class Source:
    """A contiguous range of atoms created by one op (``active``) or one raw parameter."""

    start: int
    stop: int
    name: str
    active: bool


def ignore_reason(module: str) -> str:
    """Why the channels of ``module`` stay when the user lists it in ``ignore``."""
    return f"module '{module}' is in ignore"


def is_ignore_reason(reason: str) -> bool:
    """Whether ``reason`` is :func:`ignore_reason`'s: the user's choice, not a limit found."""
    return reason.startswith("module '") and reason.endswith("' is in ignore")


@dataclass
class TraceState:
    """Everything one or more traced forward passes learned about a model."""

    n_atoms: int = 0
    sources: list[Source] = field(default_factory=list)
    unions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    param_elems: list[tuple[str, Tensor]] = field(default_factory=list)
    blocked: list[tuple[np.ndarray, str]] = field(default_factory=list)
    # Atoms an op mixes (a normalisation or softmax over channels), with the op: removing
    # one changes the op's other outputs, so the prune is no longer exact there.
    mixing: list[tuple[np.ndarray, str]] = field(default_factory=list)
    # A size read from a parameter's shape and used as a value: (tensor, dim, reason), resolved
    # against that dim's members once they are known (:func:`prunekit.graph.dependency.build_groups`).
    param_size_values: list[tuple[str, int, str]] = field(default_factory=list)
    # A reshape target computed from another tensor's size: (the size's rows, the output's
    # compact label, where); the groups on both sides must keep proportional counts.
    size_ties: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    # A quotient of a size by a module attribute (``C // num_heads``) used as a value: (its
    # tag, reason). The plan must leave it unchanged (:func:`prunekit.planning.changed_quotients`).
    quotients: list[tuple[SizeTag, str]] = field(default_factory=list)
    # A per-channel operand broadcast over a dim where the other operand's channels vary (a
    # layer scale over two token sets): (its atoms, the other's atoms at the same positions),
    # joined after tracing where consistent (:func:`prunekit.graph.dependency.join_shared_scales`).
    shared_scales: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    grids: dict[tuple[Any, ...], np.ndarray] = field(default_factory=dict)
    ops: dict[str, list[OpRecord]] = field(default_factory=dict)
    calls: dict[str, list[ModuleCall]] = field(default_factory=dict)
    module_params: dict[str, int] = field(default_factory=dict)  # own parameters (not submodules') per module
    uf: UnionFind = field(default_factory=lambda: UnionFind(1024))
    meta: bool = False  # traced on meta tensors (validation then starts with them too)


def op_name(func: Callable[..., Any]) -> str:
    """Canonical name of a torch function: ``__iadd__``/``add_``/``__add__`` -> ``add``."""
    try:
        return _OP_NAMES[func]
    except (KeyError, TypeError):
        pass
    name = _op_name(func)
    try:
        _OP_NAMES[func] = name
    except TypeError:
        pass
    return name


_OP_NAMES: dict[Callable[..., Any], str] = {}


def _op_name(func: Callable[..., Any]) -> str:
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        # torch.ops / torch.library custom ops: 'namespace::name' (aten ops lose the prefix).
        qual = func._schema.name if isinstance(func, torch._ops.OpOverload) else func._qualified_op_name
        return qual.removeprefix("aten::")
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "attr." + str(getattr(owner, "__name__", "?"))
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core in ("getitem", "setitem"):
            return core
        if core.startswith(("r", "i")) and core[1:] in _DUNDER_BINARY:
            return core[1:]
        return core
    if name.endswith("_") and not name.startswith("_"):
        return name[:-1]
    return name


_DUNDER_BINARY = {
    "add", "sub", "mul", "truediv", "floordiv", "pow", "matmul", "and", "or", "xor", "mod",
}


class Tracer:
    """Records channel flow of ``model`` into a :class:`TraceState` (see module docstring)."""

    def __init__(self, model: nn.Module, state: TraceState | None = None) -> None:
        self.model = model
        self.state = state if state is not None else TraceState()
        self.tensor_names: dict[int, str] = {}
        for kind in ("_parameters", "_buffers"):  # a tensor's first parameter name wins, as before buffers
            for name, _, _, t in named_tensors(model, (kind,)):
                self.tensor_names.setdefault(id(t), name)
        self.module_names = {id(m): n for n, m in walk(model)}
        self.values: dict[int, tuple[tuple[int, ...], Tensor, int]] = {}
        self.version = 0  # bumped on every new union: labels older than it may shrink
        self.keep_alive: list[Tensor] = []
        self.stack: list[str] = [""]
        self.ops: list[OpRecord] = []
        self.ignored_prefixes: tuple[str, ...] = ()
        # Dataflow: id(tensor) -> value id of its latest producer (an in-place op makes a
        # new value), and the module calls of the pass with the stack of open ones.
        self.value_ids: dict[int, int] = {}
        self.n_values = 0
        self.calls: list[ModuleCall] = []
        self.open_calls: list[int] = [-1]
        self.aux_labs: dict[str, Tensor] = {}  # set by a rule, moved into its op's record
        self._if_used: list[tuple[Tensor, Tensor, str]] = []  # set by a rule, resolved into self.pending
        self.pending: list[tuple[int, Tensor, str]] = []  # (value id, atoms, reason): blocked if the value is used
        self.busy = False  # inside a torch call (a float conversion there is torch's, not the model's)
        self.size_cache: dict[tuple[int, int], SizeTag | None] = {}
        self._sources_seen = -1
        self._starts = self._active = np.zeros(0)
        if not self.state.module_params:
            self.state.module_params = {n: sum(p.numel() for p in m._parameters.values() if p is not None)
                                        for n, m in walk(model)}

    # ----------------------------------------------------------------- atoms & labels
    def new_atoms(self, n: int, name: str, *, active: bool = True) -> Tensor:
        """Allocate ``n`` fresh atoms for a producer named ``name``; returns their ids."""
        st = self.state
        start = st.n_atoms + 1
        st.n_atoms += n
        st.sources.append(Source(start, start + n, name, active))
        st.uf.grow(st.n_atoms)
        atoms = torch.arange(start, start + n, dtype=torch.long)
        if active and self.ignored_prefixes and under(name, self.ignored_prefixes):
            self.block(atoms, ignore_reason(name))
        return atoms

    def union(self, a: Tensor, b: Tensor) -> None:
        """Record that atoms ``a[i]`` and ``b[i]`` must be pruned together (0s are skipped)."""
        an, bn = np.broadcast_arrays(a.numpy().reshape(-1), b.numpy().reshape(-1))
        mask = (an != 0) & (bn != 0) & (an != bn)
        if mask.any():
            an, bn = an[mask], bn[mask]
            new = self.state.uf.union(an, bn)
            if new.any():
                self.version += 1
                self.state.unions.append((an[new].copy(), bn[new].copy()))

    def tie(self, atoms: Tensor) -> None:
        """Union every non-zero atom in ``atoms`` with each other."""
        self.tie_rows(atoms.reshape(1, -1))

    def tie_rows(self, rows: Tensor) -> Tensor:
        """Union the non-zero atoms within each row of a 2-D tensor (vectorised).

        Returns one representative atom per row (0 for an all-zero row).
        """
        rep = rows.amax(dim=1) if rows.shape[1] else torch.zeros(rows.shape[0], dtype=torch.long)
        mask = rows != 0
        if rows.shape[1] > 1 and bool(mask.any()):
            self.union(rep.unsqueeze(1).expand_as(rows)[mask], rows[mask])
        return rep

    def block(self, atoms: Tensor, reason: str) -> None:
        """Mark atoms unprunable, with a reason shown to the user."""
        nz = atoms.reshape(-1)
        nz = nz[nz != 0]
        if nz.numel():
            self.state.blocked.append((np.unique(nz.numpy()), reason))

    def mixes(self, lab: Tensor, dims: Iterable[int], what: str) -> None:
        """Record that an op combines the channels ``lab`` carries along ``dims`` (a
        statistic or softmax over them): pruning them changes the op's other outputs."""
        dims = [d % lab.ndim for d in dims] if lab.ndim else []
        if any(lab.shape[d] > 1 for d in dims):
            atoms = np.unique(lab.numpy())
            atoms = atoms[atoms != 0]
            if atoms.size:
                self.state.mixing.append((atoms, f"{what} in module '{self.current}'"))

    def block_if_used(self, t: Tensor, atoms: Tensor, reason: str) -> None:
        """Block ``atoms`` if an op output ``t`` (of the op being recorded) is read by a later op
        or reaches the model output: for a tensor whose values, not its shape, depend on those
        channels (head-averaged attention weights), and which the code may well discard."""
        self._if_used.append((t, atoms, reason))

    def name_of(self, t: Tensor) -> str | None:
        """Qualified parameter/buffer name of ``t``, or None for an activation."""
        return self.tensor_names.get(id(t))

    def lab(self, t: Tensor) -> Tensor:
        """Compact label of ``t``; raw parameters/buffers get one fresh atom per element."""
        v = self.values.get(id(t))
        if v is not None:
            if v[2] == self.version:
                return v[1]
            lab = self.canon(v[1])
            self.values[id(t)] = (v[0], lab, self.version)
            return lab
        name = self.name_of(t)
        if name is not None and t.numel() <= 4_000_000:
            atoms = self.new_atoms(t.numel(), name, active=False).view(t.shape)
            self.state.param_elems.append((name, atoms))
            self.set(t, atoms)
            return atoms
        return zeros_like_shape(tuple(t.shape))

    def canon(self, lab: Tensor) -> Tensor:
        """Replace atoms by their current representatives and re-compact: once channels
        are tied (a class token joined to the patch tokens), labels shrink back."""
        if lab.numel() == 0 or not bool((lab != 0).any()):
            return lab
        return compact(torch.from_numpy(self.state.uf.find(lab.numpy().reshape(-1)).reshape(tuple(lab.shape))))

    def tracked(self, t: Tensor) -> bool:
        """True if ``t`` is an activation we traced or a named parameter/buffer."""
        return id(t) in self.values or id(t) in self.tensor_names

    def set(self, t: Tensor, lab: Tensor) -> None:
        """Attach a (compact) label to a tensor."""
        if lab.ndim != t.ndim:
            lab = lab.reshape((1,) * (t.ndim - lab.ndim) + tuple(lab.shape)) if lab.ndim < t.ndim else lab
        self.values[id(t)] = (tuple(t.shape), lab, self.version)
        self.keep_alive.append(t)

    def full(self, t: Tensor, dtype: torch.dtype = torch.long) -> Tensor:
        """Label of ``t`` materialised to its full shape (ops run on it)."""
        return self.lab(t).to(dtype).expand(t.shape).contiguous()

    def add_member(self, t: Tensor | None, dim: int, atoms: Tensor, role: str) -> None:
        """Attach dim ``dim`` of parameter/buffer ``t`` to ``atoms`` (one per index)."""
        if t is None:
            return
        name = self.name_of(t)
        if name is None:
            self.attach_computed(t, dim % t.ndim, atoms.reshape(-1), role)
            return
        if atoms.numel() != t.shape[dim]:
            raise AssertionError(f"member size mismatch for {name} dim {dim}")
        self.state.members.append(Member(name, dim, atoms.reshape(-1).numpy().copy(), role))

    # ----------------------------------------------------------------- weights computed in forward
    def from_params(self, t: Tensor) -> bool:
        """Whether ``t`` holds parameter (or buffer) elements and no activation's channel:
        a tensor computed from parameters alone (``torch.cat((q_bias, k_bias, v_bias))``, a
        standardised conv weight, ``w.to(dtype)``)."""
        lab = self.lab(t).numpy()
        nz = lab[lab != 0]
        if not nz.size:
            return False
        starts, active = self._source_table()
        return not active[np.searchsorted(starts, np.unique(nz), side="right") - 1].any()

    def _source_table(self) -> tuple[np.ndarray, np.ndarray]:
        """First atom and ``active`` flag of every source, in atom order (cached until the
        next source)."""
        sources = self.state.sources
        if self._sources_seen != len(sources):
            self._starts = np.fromiter((s.start for s in sources), dtype=np.int64, count=len(sources))
            self._active = np.fromiter((s.active for s in sources), dtype=bool, count=len(sources))
            self._sources_seen = len(sources)
        return self._starts, self._active

    def attach_computed(self, t: Tensor, dim: int, atoms: Tensor, role: str) -> None:
        """Attach dim ``dim`` of a weight computed in forward to ``atoms`` through the
        parameters it is computed from, or block ``atoms`` when it cannot be sliced.

        Element-wise ops, ``cat`` and views keep each element's parameter atom, so an index
        of ``dim`` maps to parameter elements. Where the weight varies along ``dim`` only (a
        bias, a standardised weight's filters: statistics tie each filter's elements), those
        elements join the channel and the parameter is sliced with it; where it varies along
        other dims too (``w.to(dtype)``), the parameter dim it comes from gets a member. A
        weight constant along ``dim`` has that dim mixed (standardised over it): its
        channels stay, as do indices holding constants (``torch.zeros`` in a ``cat``)."""
        where = self.current
        lab = self.lab(t)
        if lab.ndim != t.ndim or not self.from_params(t):
            self.block(atoms, f"a computed (non-parameter) tensor is used as a weight in module '{where}'")
            return
        if lab.shape[dim] == 1:
            self.block(atoms, f"the weight used in module '{where}' is computed with its dim {dim} mixed "
                              "(e.g. standardised over it): removing one index would change the others")
            return
        moved = lab.movedim(dim, 0).reshape(lab.shape[dim], -1)
        fixed = ~(moved != 0).any(dim=1)
        if bool(fixed.any()):
            self.block(atoms[fixed], f"a weight computed in module '{where}' holds constants at these indices")
        if moved.shape[1] == 1:
            self.union(moved[~fixed, 0], atoms[~fixed])
            return
        found = self._param_dims(moved.numpy(), atoms.numpy())
        if found is None:
            self.block(atoms[~fixed], f"a weight computed in module '{where}' mixes parameter elements along dim {dim}")
            return
        for name, pdim, member in found:
            self.state.members.append(Member(name, pdim, member, role))

    def _param_dims(self, moved: np.ndarray, atoms: np.ndarray) -> list[tuple[str, int, np.ndarray]] | None:
        """For a computed weight whose row ``i`` (index ``i`` of the dim being attached)
        holds parameter element atoms ``moved[i]``: per source parameter, the dim whose index
        is the same for all its elements in a row and differs between rows, with
        ``atoms[i]`` placed at that index (a member); None when some parameter has no such dim."""
        state = self.state
        shapes = {int(a.reshape(-1)[0]) if a.numel() else -1: (name, tuple(a.shape)) for name, a in state.param_elems}
        starts, _ = self._source_table()
        src = np.where(moved != 0, np.searchsorted(starts, moved, side="right") - 1, -1)
        out = []
        for s in np.unique(src[src >= 0]).tolist():
            start = state.sources[s].start
            if start not in shapes:
                return None
            name, shape = shapes[start]
            mine = src == s
            rows = mine.any(axis=1)
            index = np.unravel_index(np.where(mine, moved - start, 0), shape)
            for pdim in range(len(shape)):
                lo = np.where(mine, index[pdim], np.iinfo(np.int64).max).min(axis=1)[rows]
                hi = np.where(mine, index[pdim], -1).max(axis=1)[rows]
                if (lo == hi).all() and len(np.unique(lo)) == len(lo):
                    member = np.zeros(shape[pdim], dtype=np.int64)
                    member[lo] = atoms[rows]
                    out.append((name, pdim, member))
                    break
            else:
                return None
        return out

    def channel_vector(self, t: Tensor, dim: int) -> Tensor:
        """Per-index atoms of ``t`` along ``dim``, tying the atoms that share an index.

        A consumer (conv, linear, norm) applies one weight slice to every element with the
        same index along ``dim``; those elements' atoms must therefore go together. Indices
        that mix tracked and untracked elements are blocked (their size is fixed elsewhere).
        """
        dim = dim % t.ndim
        return self.label_vector(self.lab(t), dim, t.shape[dim])

    def label_vector(self, lab: Tensor, dim: int, size: int) -> Tensor:
        """:meth:`channel_vector` of a tensor of label ``lab`` whose dim ``dim`` has ``size``
        entries (for rules that work on labels of intermediate results, such as einsum's)."""
        if lab.numel() == lab.shape[dim]:  # varies along ``dim`` only (or nowhere): nothing to tie
            vec = lab.reshape(-1)
            return vec.expand(size).clone() if vec.numel() == 1 else vec
        if lab.shape[dim] == 1:
            moved = lab.movedim(dim, 0).reshape(1, -1)
        else:
            moved = lab.movedim(dim, 0).reshape(size, -1)
        first = moved[:, :1]
        if moved.shape[1] > 1 and not bool((moved == first).all()):
            nz = moved != 0
            mixed = nz.any(1) & ~nz.all(1)
            if bool(mixed.any()):
                self.block(moved[mixed], f"channels meet an untracked tensor in module '{self.current}'")
            first = self.tie_rows(moved).unsqueeze(1)
        vec = moved[:, 0] if moved.shape[1] == 1 else first[:, 0]
        return vec.expand(size).clone() if vec.numel() == 1 else vec

    def produced(self, lab: Tensor) -> bool:
        """Whether some atom of ``lab`` is, or is joined with, a channel some layer produced
        (an atom of an active source), rather than only raw parameter elements (which become
        channels only when joined with produced ones) or nothing."""
        atoms = np.unique(lab.numpy())
        atoms = atoms[atoms != 0]
        active = [np.arange(s.start, s.stop) for s in self.state.sources if s.active]
        if not len(atoms) or not active:
            return False
        uf = self.state.uf
        return bool(np.isin(uf.find(atoms), uf.find(np.concatenate(active))).any())

    def add_grid(self, lab: Tensor) -> None:
        """Remember a label varying along 2+ dims: its kept set must be a product set."""
        squeezed = lab.squeeze()
        if squeezed.ndim < 2 or not bool((squeezed != 0).any()):
            return
        arr = squeezed.numpy()
        key = (arr.shape, hash(arr.tobytes()))
        self.state.grids.setdefault(key, arr.copy())

    @property
    def current(self) -> str:
        """Path of the innermost module being executed ('' for the root)."""
        return self.stack[-1]

    # ----------------------------------------------------------------- running
    def handle(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``func`` (on real or meta tensors), then apply its channel rule to the outputs;
        a size read returns :class:`~prunekit.graph.sizes.SizeInt` s (see :meth:`read_size`)."""
        name = op_name(func)
        used = value_uses(name, args, kwargs)
        if used:
            self.size_used_as_value(used, f"by '{name}'")
        out = meta_shortcut(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        outs = call_outputs(func, args, out)
        if not outs:
            return self.read_size(name, args, kwargs, out) if name in _SIZE_READS else out
        self._record(name, func, args, kwargs, outs)
        return out

    # ----------------------------------------------------------------- sizes read from tensors
    def read_size(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        """``out`` (the result of ``x.shape``, ``x.size(d)``, ``x.numel()``, ``len(x)``) with
        every size that counts channels returned as a :class:`SizeInt` tagged with them."""
        t = args[0] if args else None
        if not isinstance(t, Tensor) or not self.tracked(t):
            return out
        if isinstance(out, torch.Size):
            return torch.Size([tagged(n, self._size_tags(t, d)) for d, n in enumerate(out)])
        if not isinstance(out, int):
            return out
        if name == "numel":
            tags: Tags = ()
            for d in range(t.ndim):
                tags = merge(tags, self._size_tags(t, d))
            return tagged(out, tags)
        dim = 0 if name == "len" else (args[1] if len(args) > 1 else kwargs.get("dim"))
        return tagged(out, self._size_tags(t, dim)) if isinstance(dim, int) else out

    def _size_tags(self, t: Tensor, dim: int) -> Tags:
        """The tag of dim ``dim`` of ``t`` (none when no channel decides its size)."""
        dim %= max(t.ndim, 1)
        name = self.name_of(t)
        if name is not None:
            # A parameter's dim: which channels it holds is known once its members are.
            return (SizeTag(None, f"dim {dim} of '{name}' read in module '{self.current}'", (name, dim)),)
        lab = self.lab(t)
        key = (id(lab), dim)
        if key not in self.size_cache:
            tag = None
            if lab.ndim == t.ndim and lab.shape[dim] > 1 and bool((lab != 0).any()):
                rows = lab.movedim(dim, 0).reshape(lab.shape[dim], -1).numpy().copy()
                tag = SizeTag(rows, f"dim {dim} of a tensor in module '{self.current}'")
            self.size_cache[key] = tag
            self.keep_alive.append(lab)  # the cache key must not be reused by another label
        tag = self.size_cache[key]
        return (tag,) if tag is not None else ()

    def size_used_as_value(self, tags: Tags, how: str) -> None:
        """Sizes read from tensors are used as values (``how``, e.g. "by 'div'"): pruning
        would change those values silently, so the channels they count keep their number."""
        for tag in tags:
            reason = (f"a channel count read from a tensor's shape ({tag.where}) is used as a value {how} "
                      f"in module '{self.current}'")
            if tag.param is not None:
                self.state.param_size_values.append((*tag.param, reason))
            elif tag.per is not None:
                self.state.quotients.append((tag, reason))
            elif len(tag.keep):
                # numpy only: this may run in the model's own code, where a torch call would be traced
                self.state.blocked.append((np.unique(tag.keep), reason))

    def _reshape_ties(self, name: str, args: tuple[Any, ...], lab: Tensor) -> None:
        """A view/reshape target computed from a size read from a tensor (``reshape(B, N,
        C)``, ``C // num_heads``) sets an output dim that carries channels: the channels the
        size counts and the output's channels must keep proportional counts (recorded in
        ``state.size_ties``; :func:`prunekit.graph.dependency.group_ties` makes groups of it)."""
        if name == "unflatten":
            dim, sizes = (args[1], args[2]) if len(args) > 2 else (None, ())
            if not isinstance(dim, int):
                return
            targets = {dim % lab.ndim + k: v for k, v in enumerate(sizes)}
        else:
            target = list(args[1:])
            if len(target) == 1 and isinstance(target[0], (tuple, list)):
                target = list(target[0])
            if len(target) != lab.ndim:
                return
            targets = dict(enumerate(target))
        # A label that is one atom throughout (a single attention head) may carry it along any
        # dim: tied too, which keeps the other side whole (one channel cannot shrink).
        single = lab.numel() == 1 and bool(lab.reshape(-1)[0] != 0)
        for d, v in targets.items():
            for tag in tags_of(v):
                if tag.rows is not None and d < lab.ndim and (lab.shape[d] > 1 or single):
                    self.state.size_ties.append(
                        (tag.rows, lab.numpy().copy(),
                         f"'{name}' in module '{self.current}' sizes dim {d} with {tag.where}"))

    def _float_used(self, tags: Tags) -> None:
        if not self.busy:
            self.size_used_as_value(tags, "after a conversion to float (float(), math.*)")

    def _record(self, name: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                outs: list[Tensor]) -> None:
        from prunekit.graph.rules import apply_rule

        ins = tensors_in((args, kwargs))
        version = self.version
        labs = apply_rule(self, name, func, args, kwargs, ins, outs)
        # Labels of the tracked inputs as stored (any atom id maps to its channel later).
        in_labs = [self.values[id(t)][1] for t in ins if id(t) in self.values]
        # Inputs' labels are canonical for the version they were read at: unless the rule
        # itself joined atoms, its outputs need no re-mapping, only compacting (and an
        # input's own label, passed through, is compact already).
        if self.version != version:
            labs = [self.canon(lab) for lab in labs]
        else:
            known = {id(lab) for lab in in_labs}
            labs = [lab if id(lab) in known else compact(lab) for lab in labs]
        for t, lab in zip(outs, labs):
            self.set(t, lab)
            if lab.ndim and sum(s > 1 for s in lab.shape) >= 2:
                self.add_grid(lab)
        if name in _RESHAPES and len(labs) == 1:
            self._reshape_ties(name, args, labs[0])
        value_ids = self.value_ids
        in_values = [value_ids.get(id(t), -1) for t in ins]  # read before the outputs (maybe the inputs) get new ids
        first = self.n_values
        self.n_values = first + len(outs)
        for v, t in enumerate(outs, first):
            value_ids[id(t)] = v
        for t, atoms, reason in self._if_used:
            self.pending.append((value_ids[id(t)], atoms, reason))
        self._if_used = []
        aux, self.aux_labs = self.aux_labs, {}
        self.ops.append(
            OpRecord(len(self.ops), name, self.current, [tuple(t.shape) for t in outs], list(labs), in_labs,
                     *((_strip_tensors(args), _strip_tensors(kwargs)) if name in SIZE_ARG_OPS else ((), {})),
                     in_values, list(range(first, self.n_values)),
                     [tuple(t.shape) for t in ins] if name in WEIGHTED_OPS else [],
                     data_dependent(name, args, kwargs, ins), aux)
        )

    def new_values(self, tensors: list[Tensor]) -> list[int]:
        """Value ids of ``tensors``, giving fresh ones to tensors not seen yet (model inputs)."""
        out = []
        for t in tensors:
            v = self.value_ids.get(id(t))
            if v is None:
                v = self.value_ids[id(t)] = self.n_values
                self.n_values += 1
                self.keep_alive.append(t)  # its id must not be reused by another tensor this pass
            out.append(v)
        return out

    def run(self, example_inputs: Any, mode: str, *, meta: bool = False, swapped: MetaStandIns | None = None) -> None:
        """Trace one forward pass in ``mode`` ('eval' or 'train' with BN frozen).

        With ``meta`` the forward runs on meta tensors (shapes only, no arithmetic, the
        model's own tensors untouched), which is all the channel rules need and costs a
        fraction of a real forward; ``swapped`` reuses stand-ins from :func:`meta_tensors`.
        """
        model = self.model
        hooks = []
        names = self.module_names

        calls = self.calls
        open_calls = self.open_calls
        value_ids = self.value_ids

        def pre(mod: nn.Module, args: Any) -> None:
            name = names.get(id(mod))
            if name is not None:
                self.stack.append(name)
                open_calls.append(len(calls))
                calls.append(ModuleCall(len(calls), name, open_calls[-2], self.new_values(tensors_in(args)),
                                        len(self.ops)))

        def post(mod: nn.Module, _args: Any, out: Any) -> None:
            if id(mod) in names and len(self.stack) > 1:
                self.stack.pop()
                c = calls[open_calls.pop()]
                c.out_values = [value_ids.get(id(t), -1) for t in tensors_in(out)]
                c.last_op = len(self.ops) - 1
                c.stop = len(calls)

        # Two global hooks instead of two per module: creating a handle costs ~0.2 ms.
        from torch.nn.modules import module as _module

        hooks.append(_module.register_module_forward_pre_hook(pre))
        hooks.append(_module.register_module_forward_hook(post, always_call=True))
        try:
            swapped = (swapped if swapped is not None else meta_tensors(model)) if meta else None
            example_inputs = inputs_for(example_inputs, mode)
            inputs = to_meta(example_inputs) if meta else example_inputs
            if swapped is not None:
                for name, t in swapped.items():
                    self.tensor_names.setdefault(id(t), name)
                self.keep_alive.extend(swapped.values())
            self.new_values(tensors_in(inputs))  # keyword inputs included (a pre-hook sees positional ones only)
            # Int attributes are marked with their module and name for the pass: the size
            # arguments an op records then say which attribute they came from (graph.sizes).
            with model_mode(model, mode), torch.no_grad(), mark_attributes(names, unique_modules(model)), _Mode(self):
                out = call(model, inputs, swapped)
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    self.block(self.lab(t), "it reaches the model output")
            self._resolve_pending([t for t in tree_flatten(out)[0] if isinstance(t, Tensor)])
        finally:
            for h in hooks:
                h.remove()
        self.state.ops[mode] = self.ops
        self.state.calls[mode] = self.calls
        self.ops = []
        self.calls = []
        self.pending = []
        self.open_calls = [-1]
        self.value_ids.clear()
        self.n_values = 0
        self.values.clear()
        self.keep_alive.clear()
        self.size_cache.clear()
        self.stack = [""]


    def _resolve_pending(self, outputs: list[Tensor]) -> None:
        """Apply the :meth:`block_if_used` blocks whose value an op read or the model returned."""
        if not self.pending:
            return
        used = {v for op in self.ops for v in op.in_values}
        used.update(self.value_ids.get(id(t), -1) for t in outputs)
        for value, atoms, reason in self.pending:
            if value in used:
                self.block(atoms, reason)


_SIZE_READS = frozenset({"attr.shape", "size", "numel", "len"})
_RESHAPES = frozenset({"view", "reshape", "unflatten"})


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __enter__(self) -> "_Mode":
        float_listener.append(self.tracer._float_used)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        float_listener.remove(self.tracer._float_used)
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        tracer = self.tracer
        tracer.busy = True
        try:
            return tracer.handle(func, tuple(args), dict(kwargs or {}))
        finally:
            tracer.busy = False


def tensors_in(obj: Any) -> list[Tensor]:
    """The tensors inside ``obj`` (nested tuples, lists and dict values), in order: the
    arguments and results of torch functions (a cheaper ``tree_flatten`` for them)."""
    if isinstance(obj, Tensor):
        return [obj]
    out: list[Tensor] = []
    _collect(obj, out)
    return out


def call_outputs(func: Callable[..., Any], args: tuple[Any, ...] | list[Any], out: Any) -> list[Tensor]:
    """The tensors a torch call produced: its tensor results, or for ``x[idx] = y`` (the one
    mutating call that returns None; ``add_``, ``index_put_``, ``masked_fill_``... return
    the tensor they change) the mutated ``x``, so that its new channels are recorded like
    any in-place op's. The tracer and the shape recorder must agree on this, since
    validation compares their op sequences one to one."""
    if out is None and args and isinstance(args[0], Tensor) and op_name(func) == "setitem":
        return [args[0]]
    return tensors_in(out)


def _collect(obj: Any, out: list[Tensor]) -> None:
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _collect(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _collect(o, out)


def _strip_tensors(obj: Any) -> Any:
    """Keep only the non-tensor arguments (ints, shapes) of a call: used to fix attributes."""
    if isinstance(obj, Tensor):
        return None
    if isinstance(obj, (tuple, list)):
        return type(obj)(_strip_tensors(o) for o in obj) if not hasattr(obj, "_fields") else tuple(obj)
    if isinstance(obj, dict):
        return {k: _strip_tensors(v) for k, v in obj.items()}
    if isinstance(obj, SizeInt):
        return ShapeInt(obj)  # a SizeInt's tags matter while tracing only; its provenance stays
    if isinstance(obj, SizeFloat):
        return float(obj)
    if isinstance(obj, (int, float, bool, str, type(None), torch.Size)):
        return obj  # an AttrInt stays: it names the attribute a size came from
    return None


def under(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one (``layer1.0.conv1`` is
    under ``layer1``, not under ``layer``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)
