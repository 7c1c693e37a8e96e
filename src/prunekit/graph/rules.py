"""Channel rules: how each torch op creates, couples, consumes or passes channels.

A rule gets the tracer, the op and its real inputs/outputs and returns one compact label
per output tensor. Rules are looked up by canonical op name (see ``tracer.op_name``); an
op without a rule that touches tracked channels blocks them, naming the op and module, so
an unknown op can never produce a wrong model, only a less pruned one.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from prunekit.graph.labels import align, compact, zeros_like_shape
from prunekit.graph.tracer import NeedsRealTensors, Tracer, tensors_in

Rule = Callable[[Tracer, str, Callable[..., Any], tuple[Any, ...], dict[str, Any], list[Tensor], list[Tensor]], list[Tensor]]
RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a channel rule for torch ops with these canonical names (extension point)."""

    def deco(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def apply_rule(tr: Tracer, name: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Apply the rule registered for ``name`` (or the blocking fallback) and return labels."""
    rule = RULES.get(name)
    if rule is None:
        return _unknown(tr, name, ins, outs)
    return rule(tr, name, func, args, kwargs, ins, outs)


def _unknown(tr: Tracer, name: str, ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    for t in ins:
        if id(t) in tr.values:
            tr.block(tr.lab(t), f"op '{name}' in module '{tr.current}' is not supported")
    return [zeros_like_shape(tuple(o.shape)) for o in outs]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, key: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


# ---------------------------------------------------------------------- element-wise
_UNARY = """relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu selu celu mish
softplus softsign logsigmoid tanhshrink dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
neg abs exp exp2 expm1 log log2 log10 log1p sqrt rsqrt erf erfc sin cos reciprocal square sign clamp clip clamp_min
clamp_max threshold contiguous clone detach float half double bfloat16 to type type_as requires_grad cpu cuda
nan_to_num pos logical_not bitwise_not isnan isinf isfinite
zeros_like ones_like empty_like full_like rand_like randn_like attr.data sigmoid attr.real round floor ceil trunc
frac gelu_ fill zero hardshrink softshrink rrelu silu_ copy""".split()
_BINARY = """add sub rsub mul div true_divide truediv floor_divide floordiv maximum minimum pow fmod remainder mod
where addcmul addcdiv lerp masked_fill eq ne lt le gt ge logical_and logical_or bitwise_and and or xor hypot atan2
copysign""".split()


@register_rule(*_UNARY, *_BINARY)
def elementwise(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Broadcasting element-wise op: aligned channels of all operands are coupled."""
    out = outs[0]
    nd = out.ndim
    if name == "where" and len(args) + len(kwargs) == 1:
        return [zeros_like_shape(tuple(o.shape)) for o in outs]  # where(cond): the indices of true elements
    if len(ins) == 1 and len(outs) == 1 and ins[0].ndim == nd:
        return [tr.lab(ins[0])]  # unary: the output carries the input's channels
    if len(ins) == 2 and len(outs) == 1 and ins[0].ndim == nd == ins[1].ndim:
        # Fast path for the common binary case (residual add, SE scale): both labels vary
        # along the same dims, where neither operand broadcasts, and carry no untracked
        # element. The channels are tied and the output carries them.
        la, lb = tr.lab(ins[0]), tr.lab(ins[1])
        if la.shape == lb.shape and all(n == 1 or (ins[0].shape[d] == ins[1].shape[d] == out.shape[d])
                                        for d, n in enumerate(la.shape)) \
                and la.numpy().all() and lb.numpy().all():
            tr.union(la, lb)
            return [la]
    ops = [(align(tr.lab(t), nd), (1,) * (nd - t.ndim) + tuple(t.shape)) for t in ins if t.ndim <= nd]
    used: list[Tensor] = []
    for i, (lab, shape) in enumerate(ops):
        others_vary = {d for j, (other, _) in enumerate(ops) if j != i for d in range(nd) if other.shape[d] > 1}
        if any(shape[d] == 1 for d in others_vary):
            # Broadcast across channels (a scalar gate, a size-1 bias): not per-channel. Unless
            # it is a per-channel scale of channel sets the rest of the trace couples anyway.
            if _scales_shared_channels(i, ops):
                tr.state.shared_scales.extend(_aligned(i, ops))
            continue
        used.append(lab)
    if not used:
        return [zeros_like_shape(tuple(o.shape)) for o in outs]
    labs = torch.broadcast_tensors(*used)
    result = labs[0]
    for lab in labs[1:]:
        fixed = (result == 0) != (lab == 0)
        if bool(fixed.any()):
            # A channel meets a tensor whose size is fixed by the code or the input.
            tr.block(torch.where(fixed, result + lab, 0),
                     f"channels meet an untracked tensor in '{name}' in module '{tr.current}'")
        tr.union(result, lab)
        result = torch.where(result != 0, result, lab)
    result = compact(result)
    return [result if o.ndim == nd else zeros_like_shape(tuple(o.shape)) for o in outs]


def _scales_shared_channels(i: int, ops: list[tuple[Tensor, tuple[int, ...]]]) -> bool:
    """Whether operand ``i`` (label, shape; broadcast along a dim where another operand's
    label varies) may be per-channel: its label varies along some dims, and every operand
    varying where it broadcasts varies along those dims too. A layer scale ``gamma * x`` with
    ``x`` the concatenation of two token sets (XCiT's class attention) and a rotary ``cos``
    over heads may be (:func:`prunekit.graph.dependency.join_shared_scales` then tells them
    apart); a one-channel gate over a tensor's channels (varying nowhere) and one side of an
    outer product (the other side varies along other dims) are not."""
    lab, shape = ops[i]
    own = {d for d in range(lab.ndim) if lab.shape[d] > 1}
    if not own:
        return False
    for j, (other, _) in enumerate(ops):
        if j == i:
            continue
        theirs = {d for d in range(other.ndim) if other.shape[d] > 1}
        if any(shape[d] == 1 for d in theirs) and not own <= theirs:
            return False
    return True


def _aligned(i: int, ops: list[tuple[Tensor, tuple[int, ...]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(atoms of operand ``i``, atoms of another operand at the same output position), over
    every position where both are tracked, for each other operand."""
    out = []
    for j, (other, _) in enumerate(ops):
        if j != i:
            a, b = (t.reshape(-1).numpy() for t in torch.broadcast_tensors(ops[i][0], other))
            both = (a != 0) & (b != 0)
            out.append((a[both].copy(), b[both].copy()))
    return out


_MIXING_DIM = {"softmax": 1, "log_softmax": 1, "softmin": 1, "normalize": 2, "cumsum": 1, "cumprod": 1,
               "logcumsumexp": 1}  # op -> position of its ``dim`` argument


@register_rule(*_MIXING_DIM)
def mixing_along(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """An op along one dim (softmax, L2 normalisation, cumulative sum): shape-preserving, so
    channels pass; along a dim that carries channels, every output depends on all of them,
    which :meth:`Tracer.mixes` records (the prune is then not exact there)."""
    x = args[0]
    default = 1 if name == "normalize" else None
    dim = _arg(args, kwargs, _MIXING_DIM[name], "dim", default)
    lab = tr.lab(x)
    if isinstance(dim, int) and x.ndim:
        tr.mixes(lab, [dim], f"'{name}' over dim {dim}")
    return [lab]


# ---------------------------------------------------------------------- shape ops
_SHAPE = """view reshape flatten unflatten permute transpose swapaxes swapdims t movedim moveaxis squeeze unsqueeze
expand expand_as broadcast_to repeat tile repeat_interleave cat concat concatenate stack hstack vstack split chunk
unbind tensor_split getitem narrow select index_select roll flip view_as reshape_as channel_shuffle
native_channel_shuffle pixel_shuffle pixel_unshuffle attr.T attr.mT attr.H attr.mH gather take_along_dim
split_with_sizes unsafe_split unsafe_chunk diagonal""".split()


@register_rule(*_SHAPE)
def shape_op(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Pure rearrangement: run the same op on the label tensors (exact for any indexing)."""

    data = [x for x in tensors_in((args, kwargs)) if x.is_floating_point() or x.is_complex()]
    self_ = args[0] if args else None
    if isinstance(self_, Tensor) and not (self_.is_floating_point() or self_.is_complex()):
        # Rearranging an integer tensor (``levels.expand_as(scores)``): its values are data,
        # not atoms, and carry no channels whatever the float arguments carry.
        return [zeros_like_shape(tuple(o.shape)) for o in outs]
    if not any(bool((tr.lab(x) != 0).any()) for x in data):
        return [zeros_like_shape(tuple(o.shape)) for o in outs]

    def run(dtype: torch.dtype) -> list[Tensor]:
        def sub(x: Any) -> Any:
            # Integer/bool tensors are indices (gather, masks): they stay as they are, and
            # their values must exist (on the meta device they do not).
            if isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex()):
                return tr.full(x, dtype)
            if isinstance(x, Tensor):
                _need_values(tr, name, [x])
            return x

        largs, lkwargs = tree_map(sub, (args, kwargs))
        lout = func(*largs, **lkwargs)
        return tensors_in(lout)

    try:
        labs = [compact(t) for t in run(torch.long)]
    except (RuntimeError, TypeError, NotImplementedError):
        # Some kernels have no integer version; float64 holds atom ids exactly (< 2**53).
        labs = [compact(t.round().long()) for t in run(torch.float64)]
    if name in ("chunk", "split", "unsafe_chunk", "unsafe_split", "tensor_split", "split_with_sizes", "unbind"):
        _tie_equal_pieces(tr, name, args, kwargs, labs)
    return labs


def _tie_equal_pieces(tr: Tracer, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], labs: list[Tensor]) -> None:
    """Equal pieces of a channel split must keep equal counts: tie position i of each piece."""
    if name == "unbind" or len(labs) < 2:
        return
    sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("chunks"))
    if name in ("split", "unsafe_split", "split_with_sizes") and not isinstance(sizes, int):
        return  # explicit sizes: each piece is free, the sizes argument gets rewritten
    dim = _arg(args, kwargs, 2, "dim", 0)
    shapes = {tuple(lab.shape) for lab in labs}
    if len(shapes) != 1:
        return
    stacked = torch.stack([lab for lab in labs])
    if stacked.shape[1 + dim % labs[0].ndim] == 1:
        return
    for i in range(1, len(labs)):
        tr.union(labs[0], labs[i])


@register_rule("pad")
def pad(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
        ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Padding (or cropping, with negative sizes) only dims along which the channels do not
    vary keeps the label: a padded position holds the same value in every channel, so it
    belongs to each channel's slice ("same" padding in front of a conv). Constant padding
    of a dim the channels vary along (the channel dim itself) is a rearrangement whose new
    positions carry no channel; reflect/replicate padding there is spatial."""
    mode = _arg(args, kwargs, 2, "mode", "constant")
    x, sizes = args[0], _arg(args, kwargs, 1, "pad")
    lab = tr.lab(x)
    padded = [x.ndim - 1 - i // 2 for i, n in enumerate(sizes) if n != 0]
    if lab.ndim == x.ndim == outs[0].ndim and all(lab.shape[d] == 1 for d in padded):
        return [lab]
    if mode == "constant":
        return shape_op(tr, name, func, args, kwargs, ins, outs)
    return spatial(tr, name, func, args, kwargs, ins, outs)


def _broadcasts(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``to`` (a masked write of one value per
    element does not: ``x[mask] = values`` takes one per *selected* element)."""
    return len(shape) <= len(to) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(to)))


@register_rule("unfold")
def unfold(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
           ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """``Tensor.unfold`` is a rearrangement. ``F.unfold`` (im2col) is one too, except that
    the zeros it pads with belong to no position of the input: where the input's channels
    do not vary over space, output channel ``c * K + k`` is input channel ``c``'s, padding
    included (it is that channel's padded map), so its K rows go with the channel."""
    x = args[0]
    if func is torch.nn.functional.unfold and isinstance(x, Tensor) and x.ndim in (3, 4) and outs[0].ndim == x.ndim - 1:
        cdim = x.ndim - 3
        lab = align(tr.lab(x), x.ndim)
        if all(n == 1 for i, n in enumerate(lab.shape) if i != cdim):
            k = outs[0].shape[cdim] // x.shape[cdim]
            vec = lab.reshape(-1).expand(x.shape[cdim]).reshape(-1, 1).expand(-1, k).reshape(-1)
            shape = [1] * outs[0].ndim
            shape[cdim] = -1
            return [vec.reshape(shape)]
    return shape_op(tr, name, func, args, kwargs, ins, outs)


@register_rule("fold")
def fold(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
         ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """``F.fold`` (col2im), the inverse of ``unfold``: input channel ``c * K + k`` (K kernel
    positions) is summed, at the positions its blocks cover, into output channel ``c``. The
    K input channels of an output channel go together; whatever varies along the blocks
    (dim -1) lands in that channel too."""
    x, out = args[0], outs[0]
    cdim = 1 if x.ndim == 3 else 0
    c_out = out.shape[cdim]
    if not tr.tracked(x) or c_out == 0 or x.shape[cdim] % c_out:
        return _unknown(tr, name, ins, outs)
    rows = tr.channel_vector(x, cdim).view(c_out, x.shape[cdim] // c_out)
    nz = rows != 0
    mixed = nz.any(1) & ~nz.all(1)
    if bool(mixed.any()):
        tr.block(rows[mixed], f"'fold' in module '{tr.current}' sums channels with untracked values")
    shape = [1] * out.ndim
    shape[cdim] = c_out
    return [tr.tie_rows(rows).view(shape)]


def _need_values(tr: Tracer, name: str, indices: list[Tensor]) -> None:
    """Index tensors whose values decide the channel flow must have values: a meta one
    stops the meta trace (which is then redone with real tensors)."""
    if any(t.device.type == "meta" for t in indices):
        raise NeedsRealTensors(f"op '{name}' in module '{tr.current}' indexes channels with tensor values")


@register_rule("setitem")
def setitem(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """``x[idx] = y``: the written positions of x carry y's channels (its one output is x).

    A constant (a number, an untracked tensor) written alike into every channel (``x[:, :,
    0] = 0``) leaves the channels as they are; written into some channels only, those
    positions are fixed by code and carry none. Channels of x the write removes entirely are
    blocked: pruning one would shift the positions the index picks (``y[:, :2] = b`` would
    then overwrite a live channel)."""
    target, index, value = args[0], args[1], args[2]
    if isinstance(index, Tensor) and index.dtype == torch.bool and index.shape == target.shape and (
            not isinstance(value, Tensor) or value.numel() == 1 or _broadcasts(tuple(value.shape), tuple(target.shape))):
        # A full-shape mask is ``x.masked_fill(m, y)``: element-wise, and exact for a mask
        # computed from x itself (``x[x < 0] = 0``), with no index values needed.
        return elementwise(tr, name, func, args, kwargs, [t for t in (target, index, value) if isinstance(t, Tensor)],
                           outs)
    _need_values(tr, name, [t for t in tensors_in(index) if not (t.is_floating_point() or t.is_complex())])
    index = tree_map(lambda t: t.cpu() if isinstance(t, Tensor) else t, index)  # labels live on the CPU
    before = tr.full(target)
    lab = before.clone()
    value_lab = tr.full(value) if isinstance(value, Tensor) else None
    if value_lab is not None and bool((value_lab != 0).any()):
        lab[index] = value_lab
    else:
        written = torch.zeros(tuple(target.shape), dtype=torch.bool)
        written[index] = True
        varying = [d for d, n in enumerate(tr.lab(target).shape) if n > 1]
        if not all(bool((written == written.narrow(d, 0, 1)).all()) for d in varying):
            lab[written] = 0
    lost = before.unique()
    lost = lost[(lost != 0) & ~torch.isin(lost, lab)]
    if lost.numel():
        tr.block(lost, f"'x[idx] = y' in module '{tr.current}' overwrites these channels at positions fixed by code")
    return [compact(lab)]


# ---------------------------------------------------------------------- spatial / reductions
_SPATIAL = """max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d max_pool1d_with_indices
max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool2d_with_indices lp_pool1d lp_pool2d interpolate
upsample upsample_nearest upsample_bilinear fractional_max_pool2d""".split()


@register_rule(*_SPATIAL)
def spatial(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Ops over dims >= 2 (pooling, resizing): channels pass through unchanged."""
    x = ins[0]
    lab = tr.lab(x)
    if lab.ndim < 2 or any(s > 1 for s in lab.shape[2:]) or lab.shape[0] > 1:
        if bool((lab != 0).any()):
            tr.block(lab, f"op '{name}' in module '{tr.current}' mixes positions that carry different channels")
        return [zeros_like_shape(tuple(o.shape)) for o in outs]
    return [lab.reshape(lab.shape[:2] + (1,) * (o.ndim - 2)) if o.ndim >= 2 else zeros_like_shape(tuple(o.shape))
            for o in outs]


@register_rule("torchvision::roi_align", "torchvision::roi_pool")
def roi_pool(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """RoI pooling (``roi_align(features, rois, ...)``): each box's output channel c pools
    feature channel c, so channels pass through; the rois are coordinates, whose size is
    fixed (any channels that reached them are blocked)."""
    rois = _arg(args, kwargs, 1, "rois")
    if isinstance(rois, Tensor):
        tr.block(tr.lab(rois), f"op '{name}' in module '{tr.current}' reads them as box coordinates")
    return spatial(tr, name, func, args, kwargs, ins, outs)


_REDUCE = """mean sum nansum amax amin max min std var norm logsumexp prod all any argmax argmin median nanmean
std_mean var_mean count_nonzero vector_norm linalg_vector_norm""".split()


@register_rule(*_REDUCE)
def reduction(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Reductions: reducing over a channel dim consumes it; over other dims keeps it."""
    if name in ("max", "min") and len(ins) >= 2:
        return elementwise(tr, name, func, args, kwargs, ins, outs)
    x = ins[0]
    lab = tr.lab(x)
    dim = _arg(args, kwargs, 1, "dim", None)
    if name in ("norm", "vector_norm", "linalg_vector_norm"):
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return [zeros_like_shape(tuple(o.shape)) for o in outs]
    dims = sorted({d % x.ndim for d in ((dim,) if isinstance(dim, int) else dim)})
    keep = [d for d in range(x.ndim) if d not in dims]
    if any(lab.shape[d] > 1 for d in dims) and tr.from_params(x):
        # Statistics of a weight (a standardised conv's per-filter mean and std): each result
        # is computed from the elements it reduces, which therefore go together.
        lab = _tie_reduced(tr, lab, dims, keep)
    if any(lab.shape[d] > 1 for d in dims):
        if any(lab.shape[d] > 1 for d in keep):
            tr.block(lab, f"'{name}' in module '{tr.current}' reduces over channels that vary with other dims")
        return [zeros_like_shape(tuple(o.shape)) for o in outs]
    reduced = lab
    for o in outs:
        if o.ndim == x.ndim:
            return [reduced for _ in outs]
    squeezed = lab.reshape([lab.shape[d] for d in keep])
    return [squeezed if o.ndim == squeezed.ndim else zeros_like_shape(tuple(o.shape)) for o in outs]


def _tie_reduced(tr: Tracer, lab: Tensor, dims: list[int], keep: list[int]) -> Tensor:
    """Tie the atoms reduced together (over ``dims``) at every index of the ``keep`` dims;
    returns the label with one representative per kept index (size 1 along ``dims``)."""
    perm = keep + dims
    moved = lab.permute(*perm)
    kept_shape = list(moved.shape[:len(keep)])
    rep = tr.tie_rows(moved.reshape(int(np.prod(kept_shape)), -1).contiguous())
    return rep.reshape(kept_shape + [1] * len(dims)).permute(*np.argsort(perm).tolist()).contiguous()


# ---------------------------------------------------------------------- layers
@register_rule("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
         ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Convolution: consumes input channels (per group), produces new output channels."""
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    transposed = name.startswith("conv_transpose")
    groups = _arg(args, kwargs, 6, "groups", 1) if transposed else _arg(args, kwargs, 6, "groups", 1)
    out = outs[0]
    c_in, c_out = x.shape[1], out.shape[1]
    vec = tr.channel_vector(x, 1)
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if groups == c_in and (c_out == c_in or (groups > 1 and c_out % c_in == 0)) and w.shape[in_dim] == 1 \
            and not transposed:
        # Depthwise, with a channel multiplier k = c_out / c_in (1 for plain depthwise):
        # outputs c*k .. c*k+k-1 are functions of input channel c only, so each input channel
        # goes with its k outputs (they carry its atom).
        outs_vec = vec.repeat_interleave(c_out // c_in)
        tr.add_member(w, 0, outs_vec, "norm")
        tr.add_member(bias, 0, outs_vec, "norm")
        return [outs_vec.view(1, -1, *([1] * (out.ndim - 2)))]
    ipg, opg = c_in // groups, c_out // groups
    atoms = tr.new_atoms(c_out, tr.current or name)
    if groups > 1:
        # Every conv group must keep the same number of channels: tie position i across groups.
        blocks_in, blocks_out = vec.view(groups, ipg), atoms.view(groups, opg)
        tr.union(blocks_in[:1].expand(groups - 1, ipg), blocks_in[1:])  # one vectorised union, not one per group
        tr.union(blocks_out[:1].expand(groups - 1, opg), blocks_out[1:])
    if transposed:
        tr.add_member(w, 0, vec, "in")
        tr.add_member(w, 1, atoms.view(groups, opg)[0], "out")
    else:
        tr.add_member(w, 1, vec.view(groups, ipg)[0], "in")
        tr.add_member(w, 0, atoms, "out")
    tr.add_member(bias, 0, atoms, "out")
    return [atoms.view(1, -1, *([1] * (out.ndim - 2)))]


@register_rule("linear")
def linear(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
           ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Linear layer: consumes the last dim, produces new output features."""
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    out = outs[0]
    if tr.name_of(w) is None and not tr.from_params(w):
        return matmul_like(tr, name, tr.lab(x), x, w.t(), None, outs)
    vec = tr.channel_vector(x, -1)
    tr.add_member(w, 1, vec, "in")
    atoms = tr.new_atoms(w.shape[0], tr.current or name)
    tr.add_member(w, 0, atoms, "out")
    tr.add_member(bias, 0, atoms, "out")
    return [atoms.view(*([1] * (out.ndim - 1)), -1)]


@register_rule("embedding")
def embedding(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Embedding lookup: produces ``embedding_dim`` new channels."""
    w = _arg(args, kwargs, 1, "weight")
    atoms = tr.new_atoms(w.shape[1], tr.current or name)
    tr.add_member(w, 1, atoms, "out")
    return [atoms.view(*([1] * (outs[0].ndim - 1)), -1)]


@register_rule("batch_norm", "instance_norm")
def batch_norm(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """BatchNorm/InstanceNorm: per-channel statistics and affine parameters follow dim 1."""
    x = args[0]
    vec = tr.channel_vector(x, 1)
    keys = ("running_mean", "running_var", "weight", "bias")
    for i, key in enumerate(keys, start=1):
        t = _arg(args, kwargs, i, key)
        if isinstance(t, Tensor) and t.ndim == 1 and t.shape[0] == x.shape[1]:
            tr.add_member(t, 0, vec, "norm")
    return [tr.lab(x)]


@register_rule("layer_norm", "rms_norm")
def layer_norm(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """LayerNorm over the last dim: affine parameters follow it (channel-mixing statistics)."""
    x = args[0]
    shape = _arg(args, kwargs, 1, "normalized_shape")
    n = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    lab = tr.lab(x)
    if n != 1:
        if any(s > 1 for s in lab.shape[x.ndim - n:]):
            tr.block(lab, f"'{name}' over several dims in module '{tr.current}'")
        return [lab]
    tr.mixes(lab, [-1], f"'{name}' (statistics over the channels)")
    vec = tr.channel_vector(x, -1)
    w = _arg(args, kwargs, 2, "weight")
    b = _arg(args, kwargs, 3, "bias") if name == "layer_norm" else None
    tr.add_member(w, 0, vec, "norm")
    tr.add_member(b, 0, vec, "norm")
    return [tr.lab(x)]


@register_rule("group_norm")
def group_norm(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """GroupNorm: every group keeps the same count, so position i is tied across groups."""
    x = args[0]
    groups = _arg(args, kwargs, 1, "num_groups")
    tr.mixes(tr.lab(x), [1], f"'{name}' (statistics over the channels of a group)")
    vec = tr.channel_vector(x, 1)
    blocks = vec.view(groups, -1)
    for g in range(1, groups):
        tr.union(blocks[0], blocks[g])
    tr.add_member(_arg(args, kwargs, 2, "weight"), 0, vec, "norm")
    tr.add_member(_arg(args, kwargs, 3, "bias"), 0, vec, "norm")
    return [tr.lab(x)]


@register_rule("prelu")
def prelu(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
          ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """PReLU: a per-channel slope (or one shared slope)."""
    x, w = args[0], args[1]
    if w.numel() > 1:
        tr.add_member(w, 0, tr.channel_vector(x, 1), "norm")
    return [tr.lab(x)]


# ---------------------------------------------------------------------- matmul & attention
@register_rule("matmul", "bmm", "mm")
def matmul(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
           ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Matrix product ``a @ b``: the contracted dim couples a's columns with b's rows."""
    a, b = args[0], args[1]
    if a.ndim < 2 or b.ndim < 2:
        return _unknown(tr, name, ins, outs)
    return matmul_like(tr, name, tr.lab(a), a, b, tr.lab(b) if tr.tracked(b) else None, outs)


def matmul_like(tr: Tracer, name: str, lab_a: Tensor, a: Tensor, b: Tensor, lab_b: Tensor | None,
                outs: list[Tensor]) -> list[Tensor]:
    """Shared core of matmul/linear-with-computed-weight; see :func:`matmul`."""
    out = outs[0]
    nd = out.ndim
    la = align(lab_a, nd)
    lb = align(lab_b if lab_b is not None else zeros_like_shape(tuple(b.shape)), nd)
    batch_varies = any(s > 1 for s in la.shape[:-2]) or any(s > 1 for s in lb.shape[:-2])
    if tr.name_of(b) is not None and b.ndim == 2 and not batch_varies:
        # x @ W with a parameter W (k, m): like a linear layer.
        vec = tr.channel_vector(a, -1)
        tr.add_member(b, 0, vec, "in")
        atoms = tr.new_atoms(b.shape[1], tr.current or name)
        tr.add_member(b, 1, atoms, "out")
        return [atoms.view(*([1] * (nd - 1)), -1)]
    if not batch_varies:
        # Channels along the contracted dim pair index by index. An operand constant along it
        # carries its channels on its other dim; raw parameter elements against such an
        # operand (a learned bias in the attention weights @ single-head values) are a
        # fixed-size tensor, not channels: nothing to tie then.
        a_var = la.shape[-1] > 1 and (lb.shape[-2] > 1 or tr.produced(la))
        b_var = lb.shape[-2] > 1 and (la.shape[-1] > 1 or tr.produced(lb))
        if a_var or b_var:
            va = _last_vec(tr, la, -1, a.shape[-1])
            vb = _last_vec(tr, lb, -2, b.shape[-2])
            if bool(((va != 0) ^ (vb != 0)).any()):
                tr.block(torch.cat([va, vb]), f"'{name}' in module '{tr.current}' contracts channels with an untracked tensor")
            tr.union(va, vb)
        rows = la.amax(dim=-1, keepdim=True) if la.shape[-2] > 1 else la.narrow(-1, 0, 1)
        cols = lb.amax(dim=-2, keepdim=True) if lb.shape[-1] > 1 else lb.narrow(-2, 0, 1)
        rows = rows if la.shape[-2] > 1 else torch.zeros_like(rows)
        cols = cols if lb.shape[-1] > 1 else torch.zeros_like(cols)
        sides = product_sides(tr, name, rows, cols)
        if sides is None:
            return [zeros_like_shape(tuple(out.shape))]
        rows, cols = sides
        res = rows if bool((rows != 0).any()) else cols
        return [compact(res)]
    # Batched product whose batch dims carry channels (attention heads): everything in one
    # batch slice goes together, and slice h of a pairs with slice h of b.
    rep_a = _slice_reps(tr, la)
    rep_b = _slice_reps(tr, lb)
    ra, rb = torch.broadcast_tensors(rep_a, rep_b)
    tr.union(ra, rb)
    rep = torch.where(ra != 0, ra, rb)
    return [compact(rep)]


@register_rule("addmm", "baddbmm")
def addmm(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
          ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """``beta * input + alpha * (a @ b)`` (``baddbmm``: batched): the product as :func:`matmul`
    (with a parameter ``b`` of shape (in, out), a linear layer: HF's ``Conv1D``), then the
    broadcast add of ``input`` (a parameter bias of the new outputs is sliced with them)."""
    bias, a, b = args[0], args[1], args[2]
    if not all(isinstance(t, Tensor) and t.ndim == (3 if name == "baddbmm" else 2) for t in (a, b)):
        return _unknown(tr, name, ins, outs)
    product = matmul_like(tr, name, tr.lab(a), a, b, tr.lab(b) if tr.tracked(b) else None, outs)[0]
    if kwargs.get("beta", 1) == 0 or not isinstance(bias, Tensor):
        return [product]
    n = outs[0].shape[-1]
    if tr.name_of(bias) is not None and tuple(bias.shape) in ((n,), (1, n)) and product.numel() == n == product.shape[-1] \
            and bool((product != 0).all()) and product.unique().numel() == n:
        tr.add_member(bias, bias.ndim - 1, product.reshape(-1), "out")  # one bias entry per new output
        return [product]
    # Any other input: an element-wise add of it and the product.
    stand_in = torch.empty(outs[0].shape, device="meta")
    tr.set(stand_in, product)
    return elementwise(tr, name, func, (bias, stand_in), {}, [bias, stand_in], outs)


def product_sides(tr: Tracer, name: str, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor] | None:
    """The kept-dim labels of a product's two operands, when at most one side carries
    channels into the output: a side holding raw parameter elements only is a fixed-size
    tensor and is dropped. Both sides carrying channels is an outer product of channels,
    which no slicing keeps: they are blocked and None returned."""
    if not (bool((rows != 0).any()) and bool((cols != 0).any())):
        return rows, cols
    if not tr.produced(cols):
        return rows, torch.zeros_like(cols)
    if not tr.produced(rows):
        return torch.zeros_like(rows), cols
    tr.block(torch.cat([rows.reshape(-1), cols.reshape(-1)]),
             f"'{name}' in module '{tr.current}' mixes channels of both operands")
    return None


def _last_vec(tr: Tracer, lab: Tensor, dim: int, size: int) -> Tensor:
    moved = lab.movedim(dim, -1).reshape(-1, lab.shape[dim])
    vec = tr.tie_rows(moved.t().contiguous())
    return vec.expand(size).clone() if vec.numel() == 1 else vec


def _slice_reps(tr: Tracer, lab: Tensor) -> Tensor:
    """Tie all atoms within each matrix slice; return one representative per slice."""
    flat = lab.reshape(*lab.shape[:-2], -1)
    rep = tr.tie_rows(flat.reshape(-1, flat.shape[-1]))
    return rep.reshape(*lab.shape[:-2], 1, 1)


@register_rule("scaled_dot_product_attention")
def sdpa(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
         ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Fused attention = softmax(q k^T + mask) v: heads of q, k, v (and mask) go together;
    with ``enable_gqa`` each kv head with the query heads it serves."""
    q, k, v = args[0], args[1], args[2]
    nd = outs[0].ndim
    reps = [_slice_reps(tr, align(tr.lab(t), nd)) for t in (q, k, v)]
    if _arg(args, kwargs, 7, "enable_gqa", False) and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        # Grouped-query attention: torch repeats k and v with repeat_interleave along the head
        # dim, so kv head j serves query heads j*G .. (j+1)*G-1 (G = query / kv heads). Tying
        # each kv head with its G query heads makes one channel of them: a kv head goes only
        # with all its query heads, and every kv head keeps G query heads.
        g = q.shape[-3] // k.shape[-3]
        reps[1:] = [r.repeat_interleave(g, dim=-3) if r.shape[-3] > 1 else r for r in reps[1:]]
    mask = _arg(args, kwargs, 3, "attn_mask")
    if isinstance(mask, Tensor) and tr.tracked(mask):
        reps.append(_slice_reps(tr, align(tr.lab(mask), nd)))
    rep = reps[0]
    for r in reps[1:]:
        a, b = torch.broadcast_tensors(rep, r)
        tr.union(a, b)
        rep = torch.where(a != 0, a, b)
    return [compact(rep)]


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@register_rule("multi_head_attention_forward")
def mha(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
        ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """``nn.MultiheadAttention``'s attention: three kinds of channels.

    * The embedding channels of query, key and value: consumed by dim 1 of the packed
      ``in_proj_weight`` (one dim for all three inputs, which it therefore ties) or of
      ``q/k/v_proj_weight``.
    * The q/k/v inner channels, produced by dim 0 of the projection (``in_proj_weight``'s
      rows in three thirds, q, k, v; ``in_proj_bias``; ``bias_k``/``bias_v``): they go by
      whole heads, since q and k of a head are contracted together and scaled by
      ``1/sqrt(head_dim)``, and head ``h``'s values reach ``out_proj``'s input columns of
      head ``h``. A head is one channel (num_heads shrinks, head_dim stays).
    * ``out_proj``'s outputs: new channels (the residual add couples them to its stream).

    Heads stay where their count is fixed by a tensor the code made: a 3-D ``attn_mask``
    (``batch * heads`` rows), ``static_k``/``static_v``, or head-averaged attention weights
    that are used (their values depend on which heads exist). Per-head weights
    (``average_attn_weights=False``) carry the heads along dim 1.

    The stock module needs ``embed_dim == num_heads * head_dim``. Coupling the two counts
    would tie the residual width to every layer's head count; instead heads and embedding
    prune independently and :mod:`prunekit.surgery` replaces a module whose widths then
    disagree by :class:`prunekit.surgery.mha.PrunedMultiheadAttention` (an exact equivalent
    holding the same tensors), whose attention function has this name and signature, so this
    rule traces it too."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    heads, separate = a["num_heads"], a["use_separate_proj_weight"]
    inner = a["q_proj_weight"].shape[0] if separate else a["in_proj_weight"].shape[0] // 3
    module = tr.current or name
    qkv = tr.new_atoms(3 * inner, module)
    per_head = tr.tie_rows(qkv.view(3, heads, inner // heads).transpose(0, 1).reshape(heads, -1))
    q_at, k_at, v_at = qkv.view(3, inner)
    _mha_inputs(tr, a, separate, qkv)
    tr.add_member(a["in_proj_bias"], 0, qkv, "out")
    for bias, atoms in ((a["bias_k"], k_at), (a["bias_v"], v_at)):
        if isinstance(bias, Tensor):
            tr.add_member(bias, bias.ndim - 1, atoms, "out")
    mask = a["attn_mask"]
    fixed = [what for what, bad in (("a 3-D attn_mask", isinstance(mask, Tensor) and mask.dim() == 3),
                                    ("static_k", a["static_k"] is not None), ("static_v", a["static_v"] is not None))
             if bad]
    if fixed:
        tr.block(per_head, f"{fixed[0]} in nn.MultiheadAttention '{module}' fixes its head count")
    w_out = a["out_proj_weight"]
    tr.add_member(w_out, 1, v_at, "in")
    out_name = tr.name_of(w_out)
    atoms = tr.new_atoms(w_out.shape[0], out_name.rpartition(".")[0] if out_name else module)
    tr.add_member(w_out, 0, atoms, "out")
    tr.add_member(a["out_proj_bias"], 0, atoms, "out")
    tr.aux_labs["inner"] = q_at
    labs = [atoms.view(*([1] * (outs[0].ndim - 1)), -1)]
    if len(outs) > 1:  # the attention weights
        weights = outs[1]
        if a["average_attn_weights"]:
            tr.block_if_used(weights, per_head, f"the head-averaged attention weights of nn.MultiheadAttention "
                                                f"'{module}' are used")
            labs.append(zeros_like_shape(tuple(weights.shape)))
        else:  # (batch, heads, target, source), unbatched (heads, target, source)
            labs.append(per_head.view(*([1] * (weights.ndim - 3)), heads, 1, 1))
    return labs


def _mha_inputs(tr: Tracer, a: dict[str, Any], separate: bool, qkv: Tensor) -> None:
    """Members of the q/k/v projections: rows are the inner channels, columns consume the
    query's, key's and value's last dim (a packed weight's one column dim consumes all three)."""
    thirds = qkv.view(3, -1)
    seen: list[Tensor] = []
    for i, (x, w_name) in enumerate(((a["query"], "q_proj_weight"), (a["key"], "k_proj_weight"),
                                     (a["value"], "v_proj_weight"))):
        w = a[w_name] if separate else a["in_proj_weight"]
        if separate:
            tr.add_member(w, 0, thirds[i], "out")
        elif i == 0:
            tr.add_member(w, 0, qkv, "out")
        if any(x is y for y in seen) and not separate:
            continue  # the same tensor through the same weight dim: one member is enough
        seen.append(x)
        tr.add_member(w, 1, tr.channel_vector(x, -1), "in")


# ---------------------------------------------------------------------- created tensors
_FACTORIES = """zeros ones empty full arange linspace randn rand randint tensor as_tensor eye new_zeros new_ones
new_empty new_full new_tensor meshgrid logspace randperm scalar_tensor _assert""".split()


@register_rule(*_FACTORIES)
def factory(tr: Tracer, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            ins: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    """Tensors created in forward carry no channels (their sizes are fixed by the code)."""
    return [zeros_like_shape(tuple(o.shape)) for o in outs]


# The einsum rule lives in its own module (it derives the coupling from the subscripts).
from prunekit.graph import einsum as _einsum  # noqa: E402,F401  (registers "einsum")
