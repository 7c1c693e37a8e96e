"""Meta-device helpers: stand-ins for a model's tensors, and output shapes of common ops
computed without their (slow, Python-decomposed) meta kernels."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from prunekit._perf import named_tensors


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


class MetaStandIns(dict):  # type: ignore[type-arg]
    """Qualified name -> meta-device stand-in of a parameter or buffer, plus the slots
    (``module._parameters`` / ``module._buffers`` entries) :func:`prunekit.runtime.call` swaps them into."""

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
