"""Run a model once under a ``TorchFunctionMode`` and record how channels flow.

The tracer executes the real forward pass (so any Python control flow, dynamic shapes and
training-only branches just work) and, for every torch function call, applies a channel
*rule* from :mod:`prunekit.graph.rules`. Rules create atoms (new output channels of conv /
linear / embedding), union atoms that must be pruned together (residual add, attention
contraction, grouped-conv blocks), attach parameter slices (*members*) to atoms, and block
atoms that cannot be pruned, always with a reason that names the op and module.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from prunekit._perf import named_tensors, unique_modules, walk
from prunekit.graph.labels import compact, zeros_like_shape
from prunekit.graph.unionfind import UnionFind


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
                          "layer_norm", "rms_norm"})
"""Ops whose non-tensor arguments hold sizes that pruning may have to rewrite (the only
ones whose arguments an :class:`OpRecord` keeps)."""


@dataclass
class OpRecord:
    """One recorded torch call: enough to predict its output shapes after pruning
    (``args``/``kwargs``: the non-tensor arguments, kept for :data:`SIZE_ARG_OPS` only)."""

    index: int
    name: str
    module: str
    out_shapes: list[tuple[int, ...]]
    out_labs: list[Tensor]
    in_labs: list[Tensor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Source:
    """A contiguous range of atoms created by one op (``active``) or one raw parameter."""

    start: int
    stop: int
    name: str
    active: bool


@dataclass
class TraceState:
    """Everything one or more traced forward passes learned about a model."""

    n_atoms: int = 0
    sources: list[Source] = field(default_factory=list)
    unions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    param_elems: list[tuple[str, Tensor]] = field(default_factory=list)
    blocked: list[tuple[np.ndarray, str]] = field(default_factory=list)
    grids: dict[tuple[Any, ...], np.ndarray] = field(default_factory=dict)
    ops: dict[str, list[OpRecord]] = field(default_factory=dict)
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

    # ----------------------------------------------------------------- atoms & labels
    def new_atoms(self, n: int, name: str, *, active: bool = True) -> Tensor:
        """Allocate ``n`` fresh atoms for a producer named ``name``; returns their ids."""
        st = self.state
        start = st.n_atoms + 1
        st.n_atoms += n
        st.sources.append(Source(start, start + n, name, active))
        st.uf.grow(st.n_atoms)
        atoms = torch.arange(start, start + n, dtype=torch.long)
        if active and self.ignored_prefixes and _under(name, self.ignored_prefixes):
            self.block(atoms, f"module '{name}' is in ignore")
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
            # A weight computed at run time has no place to be sliced: its channels are fixed.
            self.block(atoms, f"a computed (non-parameter) tensor is used as a weight in module '{self.current}'")
            return
        if atoms.numel() != t.shape[dim]:
            raise AssertionError(f"member size mismatch for {name} dim {dim}")
        self.state.members.append(Member(name, dim, atoms.reshape(-1).numpy().copy(), role))

    def channel_vector(self, t: Tensor, dim: int) -> Tensor:
        """Per-index atoms of ``t`` along ``dim``, tying the atoms that share an index.

        A consumer (conv, linear, norm) applies one weight slice to every element with the
        same index along ``dim``; those elements' atoms must therefore go together. Indices
        that mix tracked and untracked elements are blocked (their size is fixed elsewhere).
        """
        lab = self.lab(t)
        dim = dim % t.ndim
        size = t.shape[dim]
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
        """Run ``func`` (on real or meta tensors), then apply its channel rule to the outputs."""
        out = meta_shortcut(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        outs = tensors_in(out)
        if not outs:
            return out
        self._record(func, args, kwargs, outs)
        return out

    def _record(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Tensor]) -> None:
        from prunekit.graph.rules import apply_rule

        name = op_name(func)
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
        self.ops.append(
            OpRecord(len(self.ops), name, self.current, [tuple(t.shape) for t in outs], list(labs), in_labs,
                     *((_strip_tensors(args), _strip_tensors(kwargs)) if name in SIZE_ARG_OPS else ((), {})))
        )

    def run(self, example_inputs: Any, mode: str, *, meta: bool = False, swapped: MetaStandIns | None = None) -> None:
        """Trace one forward pass in ``mode`` ('eval' or 'train' with BN frozen).

        With ``meta`` the forward runs on meta tensors (shapes only, no arithmetic, the
        model's own tensors untouched), which is all the channel rules need and costs a
        fraction of a real forward; ``swapped`` reuses stand-ins from :func:`meta_tensors`.
        """
        model = self.model
        hooks = []
        names = self.module_names

        def pre(mod: nn.Module, _args: Any) -> None:
            name = names.get(id(mod))
            if name is not None:
                self.stack.append(name)

        def post(mod: nn.Module, _args: Any, _out: Any) -> None:
            if id(mod) in names and len(self.stack) > 1:
                self.stack.pop()

        # Two global hooks instead of two per module: creating a handle costs ~0.2 ms.
        from torch.nn.modules import module as _module

        hooks.append(_module.register_module_forward_pre_hook(pre))
        hooks.append(_module.register_module_forward_hook(post, always_call=True))
        try:
            swapped = (swapped if swapped is not None else meta_tensors(model)) if meta else None
            inputs = to_meta(example_inputs) if meta else example_inputs
            if swapped is not None:
                for name, t in swapped.items():
                    self.tensor_names.setdefault(id(t), name)
                self.keep_alive.extend(swapped.values())
            with model_mode(model, mode), torch.no_grad(), _Mode(self):
                out = call(model, inputs, swapped)
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    self.block(self.lab(t), "it reaches the model output")
        finally:
            for h in hooks:
                h.remove()
        self.state.ops[mode] = self.ops
        self.ops = []
        self.values.clear()
        self.keep_alive.clear()
        self.stack = [""]


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str) -> Any:
    """Put ``model`` in 'eval' or 'train' mode, restoring every module's flag afterwards.

    Training mode keeps BatchNorm frozen (running statistics are never touched and batch-1
    inputs work) and keeps the stochastic regularisers (dropout, stochastic depth, drop
    path, drop block) in eval mode: they only scale values by a random mask of the input's
    own shape, so the channel flow is the same, and the training pass then differs from the
    eval pass only where the model's own code branches on ``self.training``.
    """
    modules = unique_modules(model)
    flags = [m.training for m in modules]
    train = mode == "train"
    try:
        if any(type(m).train is not nn.Module.train for m in modules):
            model.train(train)  # some module customises train(): let it
        else:
            for m in modules:  # the same flags without ~1 ms of recursive calls on big models
                m.__dict__["training"] = train
        if train:
            for m in modules:
                if isinstance(m, _FROZEN_IN_TRAINING) or type(m).__name__ in _MASK_REGULARISERS:
                    m.__dict__["training"] = False
        yield model
    finally:
        for m, flag in zip(modules, flags):
            m.__dict__["training"] = flag


_FROZEN_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
_MASK_REGULARISERS = frozenset({"StochasticDepth", "DropPath", "DropBlock2d", "DropBlock", "DropBlockFast2d"})


_NORM_PARAMS = {  # functional norm -> (argument name, position) of its per-channel tensors
    torch.nn.functional.batch_norm: (("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4)),
    torch.nn.functional.instance_norm: (("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4)),
    torch.nn.functional.group_norm: (("weight", 2), ("bias", 3)),
}


_F = torch.nn.functional
_ACTIVATIONS = {_F.relu, _F.relu6, _F.hardtanh, _F.hardswish, _F.hardsigmoid, _F.silu, _F.gelu, _F.mish, _F.elu,
                _F.selu, _F.celu, _F.leaky_relu, _F.softplus, _F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d,
                torch.sigmoid, torch.tanh, torch.relu, Tensor.relu, Tensor.sigmoid, Tensor.tanh}
_INPLACE_ACTIVATIONS = {Tensor.relu_, Tensor.sigmoid_, Tensor.tanh_, torch.relu_, _F.relu_, _F.hardtanh_,
                        _F.leaky_relu_, _F.elu_}


@functools.cache
def _inplace_position(func: Callable[..., Any]) -> int | None:
    try:
        return list(inspect.signature(func).parameters).index("inplace")
    except (ValueError, TypeError):
        return None


def meta_shortcut(func: Callable[..., Any], args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> Tensor | None:
    """Output of a common op (activation, element-wise binary, adaptive pool, mean, linear,
    conv2d, channel norm) on a meta tensor without running it (their meta kernels are slow
    Python decompositions, most of a meta forward's time); None when ``func`` is not one, the
    input is not meta, or the call is unusual enough to leave to the kernel. Sizes are still
    checked (a norm's per-channel tensors against the input's channels, a conv's groups...),
    so a broken pruned model fails here as it would for real."""
    if not args or not isinstance(args[0], Tensor) or args[0].device.type != "meta":
        return None
    x = args[0]
    if func in _INPLACE_ACTIVATIONS:
        return x
    if func in _ACTIVATIONS:
        pos = _inplace_position(func)
        inplace = kwargs.get("inplace", args[pos] if pos is not None and len(args) > pos else False)
        return x if inplace is True else _on_meta(x)
    binary = _BINARY.get(func)  # type: ignore[call-overload]
    if binary is not None:
        return _meta_binary(x, args, kwargs, inplace=binary[0], div=binary[1])
    if func is _F.adaptive_avg_pool2d or func is _F.adaptive_max_pool2d:
        return _meta_adaptive_pool2d(x, *args[1:], **kwargs)
    if func is torch.mean or func is Tensor.mean:
        return _meta_mean(x, *args[1:], **kwargs)
    if func is _F.linear:
        return _meta_linear(x, *args[1:], **kwargs)
    if func is _F.conv2d:
        return _meta_conv2d(x, *args[1:], **kwargs)
    if func is _F.layer_norm:
        return _meta_layer_norm(x, *args[1:], **kwargs)
    spec = _NORM_PARAMS.get(func)  # type: ignore[call-overload]
    if spec is None or x.ndim < 2:
        return None
    for name, pos in spec:
        t = kwargs.get(name, args[pos] if len(args) > pos else None)
        if isinstance(t, Tensor) and t.numel() != x.shape[1]:
            raise RuntimeError(f"{getattr(func, '__name__', 'norm')}: {name} has {t.numel()} elements, "
                               f"input has {x.shape[1]} channels")
    if func is torch.nn.functional.group_norm:
        groups = kwargs.get("num_groups", args[1] if len(args) > 1 else None)
        if isinstance(groups, int) and x.shape[1] % groups:
            raise RuntimeError(f"group_norm: {x.shape[1]} channels are not divisible by {groups} groups")
    return _on_meta(x)


def _binary_ops() -> dict[Callable[..., Any], tuple[bool, bool]]:
    """Element-wise binary functions (all spellings) -> (writes into its first input, divides)."""
    out: dict[Callable[..., Any], tuple[bool, bool]] = {}
    for name, rname in (("add", "radd"), ("sub", "rsub"), ("mul", "rmul"), ("div", "rtruediv"), ("true_divide", None)):
        div = name in ("div", "true_divide")
        for f in (getattr(torch, name, None), getattr(Tensor, name, None)):
            if f is not None:
                out[f] = (False, div)
        if getattr(Tensor, name + "_", None) is not None:
            out[getattr(Tensor, name + "_")] = (True, div)
        if rname is not None:
            out[getattr(Tensor, f"__{rname}__")] = (False, div)
    for dunder in ("add", "sub", "mul", "truediv"):
        out[getattr(Tensor, f"__{dunder}__")] = (False, dunder == "truediv")
        out[getattr(Tensor, f"__i{dunder}__")] = (True, dunder == "truediv")
    return out


_BINARY = _binary_ops()


def _meta_binary(x: Tensor, args: Any, kwargs: dict[str, Any], *, inplace: bool, div: bool) -> Tensor | None:
    """Broadcast shape and promoted dtype of an element-wise binary op on meta tensors; None
    (run the real meta kernel) for anything unusual: out=, rounding modes, integer division,
    non-contiguous or non-meta operands (the output's memory layout could differ)."""
    if len(args) != 2 or (kwargs and set(kwargs) != {"alpha"}):
        return None
    other = args[1]
    if isinstance(other, Tensor):
        if other.device.type != "meta" or not other.is_contiguous():
            return None
        shape = _broadcast(tuple(x.shape), tuple(other.shape))
    elif isinstance(other, (int, float, bool)):
        shape = tuple(x.shape)
    else:
        return None
    if shape is None:
        raise RuntimeError(f"element-wise op: shapes {tuple(x.shape)} and {tuple(other.shape)} do not broadcast")
    if not x.is_contiguous():
        return None
    dtype = torch.result_type(x, other)
    if div and not dtype.is_floating_point:
        return None
    if inplace:
        if shape != tuple(x.shape) or dtype != x.dtype:
            return None
        return x
    return torch.empty(shape, dtype=dtype, device="meta")


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy broadcast of two shapes, or None when they do not broadcast."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for i, j in zip(a, b):
        if i == j or j == 1:
            out.append(i)
        elif i == 1:
            out.append(j)
        else:
            return None
    return tuple(out)


def _meta_adaptive_pool2d(x: Tensor, output_size: Any, return_indices: bool = False) -> Tensor | None:
    if return_indices or x.ndim not in (3, 4):
        return None
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2:
        return None
    h, w = (s if s is not None else x.shape[x.ndim - 2 + i] for i, s in enumerate(size))
    return torch.empty((*x.shape[:-2], h, w), dtype=x.dtype, device="meta")


def _meta_mean(x: Tensor, dim: Any = None, keepdim: bool = False, *, dtype: torch.dtype | None = None) -> Tensor | None:
    if dim is None or dtype is not None or not x.is_floating_point() or not x.is_contiguous():
        return None
    dims = {d % x.ndim for d in ((dim,) if isinstance(dim, int) else dim)} if x.ndim else set()
    if not dims:
        return None  # mean over no listed dim: let the kernel apply its own rule
    shape = [1 if i in dims else s for i, s in enumerate(x.shape)] if keepdim else \
        [s for i, s in enumerate(x.shape) if i not in dims]
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _meta_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.numel() != weight.shape[0]):
        raise RuntimeError(f"linear: input {tuple(x.shape)} @ weight {tuple(weight.shape)}"
                           f"{'' if bias is None else f' + bias {tuple(bias.shape)}'} do not match")
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device="meta")


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _meta_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1) -> Tensor | None:
    if isinstance(padding, str) or x.ndim != 4 or weight.ndim != 4:
        return None  # 'same'/'valid' and unbatched inputs take the real meta kernel
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups or \
            (bias is not None and bias.numel() != weight.shape[0]):
        raise RuntimeError(f"conv2d: input {tuple(x.shape)}, weight {tuple(weight.shape)}, groups {groups} do not match")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    h = (x.shape[2] + 2 * ph - dh * (weight.shape[2] - 1) - 1) // sh + 1
    w = (x.shape[3] + 2 * pw - dw * (weight.shape[3] - 1) - 1) // sw + 1
    if h <= 0 or w <= 0:
        raise RuntimeError(f"conv2d: output size {h}x{w} is too small")
    return torch.empty((x.shape[0], weight.shape[0], h, w), dtype=x.dtype, device="meta")


def _meta_layer_norm(x: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
                     eps: float = 1e-5) -> Tensor:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[len(x.shape) - len(shape):]) != shape or any(
            t is not None and tuple(t.shape) != shape for t in (weight, bias)):
        raise RuntimeError(f"layer_norm: input {tuple(x.shape)} does not end in normalized_shape {shape} "
                           "(or weight/bias differ)")
    return _on_meta(x)


class ShapeRecorder(TorchFunctionMode):
    """Records the name and output shapes of every torch call that returns tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = meta_shortcut(func, args, kwargs or {})
        if out is None:
            out = func(*args, **(kwargs or {}))
        outs = tensors_in(out)
        if outs:
            self.calls.append((op_name(func), [tuple(t.shape) for t in outs]))
        return out


Calls = list[tuple[str, list[tuple[int, ...]]]]


def record_shapes(model: nn.Module, example_inputs: Any, mode: str, *, meta: bool,
                  swapped: MetaStandIns | None = None) -> tuple[Calls, str | None]:
    """Run ``model`` once in ``mode`` and return its calls (name, output shapes) and the
    first line of the error it raised, if any (``swapped``: meta stand-ins to reuse)."""
    rec = ShapeRecorder()
    error: str | None = None
    try:
        swapped = (swapped if swapped is not None else meta_tensors(model)) if meta else None
        inputs = to_meta(example_inputs) if meta else example_inputs
        with model_mode(model, mode), torch.no_grad(), rec:
            call(model, inputs, swapped)
    except Exception as exc:  # noqa: BLE001 - a failing forward is reported, not raised
        error = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return rec.calls, error


class MetaStandIns(dict):  # type: ignore[type-arg]
    """Qualified name -> meta-device stand-in of a parameter or buffer, plus the slots
    (``module._parameters`` / ``module._buffers`` entries) :func:`call` swaps them into."""

    slots: list[tuple[dict[str, Any], str, Tensor]]


def meta_tensors(model: nn.Module) -> MetaStandIns:
    """Meta-device stand-ins for every parameter and buffer (tied tensors stay tied)."""
    out = MetaStandIns()
    out.slots = []
    made: dict[int, Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for name, store, key, t in named_tensors(model):
        stand = made.get(id(t))
        if stand is None:
            stand = made[id(t)] = _on_meta(t)
        out[name] = stand
        if (id(store), key) not in seen:  # a module reached by two paths is swapped once
            seen.add((id(store), key))
            out.slots.append((store, key, stand))
    return out


def to_meta(example_inputs: Any) -> Any:
    """Meta-device copies of the tensors in ``example_inputs`` (same structure)."""
    return tree_map(lambda t: _on_meta(t) if isinstance(t, Tensor) else t, example_inputs)


def _on_meta(t: Tensor) -> Tensor:
    """A meta tensor with the shape, strides and dtype of ``t`` (cheaper than ``empty_like``)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def call(model: nn.Module, example_inputs: Any, swapped: MetaStandIns | None = None) -> Any:
    """Call ``model`` on ``example_inputs`` (a tensor, a tuple of args or a dict of kwargs);
    with ``swapped`` (from :func:`meta_tensors`) on the meta device instead, in which case
    the inputs must already be meta tensors (:func:`to_meta`). The stand-ins are put in the
    modules' parameter/buffer dicts for the call (what ``torch.func.functional_call`` does,
    without its per-name module lookups) and the originals always restored."""
    if swapped is None:
        return _call(model, example_inputs)
    old = [(store, key, store[key]) for store, key, _ in swapped.slots]
    try:
        for store, key, stand in swapped.slots:
            store[key] = stand
        return _call(model, example_inputs)
    finally:
        for store, key, orig in old:
            store[key] = orig


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return self.tracer.handle(func, tuple(args), dict(kwargs or {}))


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def tensors_in(obj: Any) -> list[Tensor]:
    """The tensors inside ``obj`` (nested tuples, lists and dict values), in order: the
    arguments and results of torch functions (a cheaper ``tree_flatten`` for them)."""
    if isinstance(obj, Tensor):
        return [obj]
    out: list[Tensor] = []
    _collect(obj, out)
    return out


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
    if isinstance(obj, (int, float, bool, str, type(None), torch.Size)):
        return obj
    return None


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
