"""Handler of convolutions: 1/2/3-D, grouped, depthwise and transposed (``nn.modules.conv._ConvNd``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.handlers import LayerHandler, Put, low_rank_pair, register_handler, svd_factors

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _depthwise(attrs: dict[str, Any]) -> bool:
    """One input channel per group, with its ``k = out_channels / in_channels`` outputs (a
    channel multiplier; ``k = 1``: plain depthwise), from ``in_channels/out_channels/groups``."""
    return attrs["groups"] > 1 and attrs["groups"] == attrs["in_channels"] \
        and attrs["out_channels"] % attrs["in_channels"] == 0


def _multiplier(attrs: dict[str, Any]) -> int:
    """Outputs per input channel of a depthwise conv (see :func:`_depthwise`)."""
    return attrs["out_channels"] // attrs["in_channels"]


def _whole_blocks(keep: Tensor, k: int) -> bool:
    """Whether output indices ``keep`` are whole blocks ``c*k .. c*k+k-1``, in order."""
    if len(keep) % k:
        return False
    rows = keep.long().view(-1, k)
    return bool((rows[:, 0] % k == 0).all() and (rows == rows[:, :1] + torch.arange(k, device=keep.device)).all())


@register_handler
class ConvHandler(LayerHandler):
    """Channels are dim 1 of a batched input/output (dim 0 unbatched). ``weight`` is
    ``(out, in / groups, *kernel)``, transposed ``(in, out / groups, *kernel)``."""

    kinds = (nn.modules.conv._ConvNd,)
    has_filters = True

    def out_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """1 for a batched output, 0 for an unbatched one."""
        return ndim - len(module.kernel_size) - 1

    def in_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """1 for a batched input, 0 for an unbatched one."""
        return ndim - len(module.kernel_size) - 1

    def weight_dims(self, module: nn.Module) -> tuple[int | None, int | None]:
        """``(0, 1)``; transposed ``(1, 0)``; depthwise ``(0, None)`` (dim 1 has size 1)."""
        if module.transposed:
            return 1, 0
        if _depthwise(self.snapshot_attrs(module)):
            return 0, None
        return 0, 1

    def snapshot_attrs(self, module: nn.Module) -> dict[str, Any]:
        """``in_channels``, ``out_channels`` and ``groups``: whether it was depthwise."""
        return {k: getattr(module, k) for k in ("in_channels", "out_channels", "groups")}

    def fix_attrs(self, module: nn.Module, put: Put, previous: dict[str, Any] | None) -> None:
        """``in_channels``/``out_channels`` from the weight (times ``groups``); a depthwise conv
        stays depthwise with its channel multiplier, so its ``groups`` follows its input
        channel count."""
        w = module.weight
        if not isinstance(w, Tensor):
            return
        prev = previous or self.snapshot_attrs(module)
        if _depthwise(prev):
            c_out = w.shape[0]
            c_in = c_out // _multiplier(prev)
            put(module, "groups", c_in)
        elif module.transposed:
            c_in, c_out = w.shape[0], w.shape[1] * module.groups
        else:
            c_in, c_out = w.shape[1] * module.groups, w.shape[0]
        put(module, "in_channels", c_in)
        put(module, "out_channels", c_out)

    def flops(self, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        """``2 * batch * positions * weight.numel()``: every weight entry is one multiply-add
        per output position, or per input position for a transposed conv."""
        spatial = len(module.kernel_size)
        shape = input_shape if module.transposed else output_shape
        batch = math.prod(shape[:-spatial - 1])
        return 2 * batch * math.prod(shape[-spatial:]) * module.weight.numel()

    def slice(self, module: nn.Module, dim_kind: str, keep: Tensor) -> None:
        """Keep output (weight's out dim, bias) or input channels (weight's in dim); a depthwise
        conv's in and out channels are the same (with a multiplier ``k``, keeping input channel
        ``c`` keeps its outputs ``c*k .. c*k+k-1``, and output channels must come in such whole
        blocks). Other grouped convs are not sliced here (each group must keep as many channels)."""
        if dim_kind not in ("out", "in"):
            raise ValueError(f"dim_kind={dim_kind!r}: 'out' or 'in'")
        attrs = self.snapshot_attrs(module)
        depthwise = _depthwise(attrs)
        if module.groups > 1 and not depthwise:
            raise NotImplementedError(f"slicing a grouped {type(module).__name__} (groups={module.groups})")
        if depthwise:
            k = _multiplier(attrs)
            if dim_kind == "in":
                keep = (keep.long()[:, None] * k + torch.arange(k, device=keep.device)).reshape(-1)
            elif not _whole_blocks(keep, k):
                raise ValueError(f"a depthwise conv with {k} outputs per input keeps its outputs in whole blocks")
            dims = {"weight": 0, "bias": 0}
        else:
            out_dim, in_dim = self.weight_dims(module)
            dims = {"weight": out_dim, "bias": 0} if dim_kind == "out" else {"weight": in_dim}
        self._slice_by_dims(module, dims, keep)  # type: ignore[arg-type]

    def rank_matrix(self, module: nn.Module, kind: str = "channel") -> Tensor | None:
        """``"channel"``: the ``N x C x k...`` weight as the ``N x (C k...)`` matrix;
        ``"spatial"`` (2-D kernels with both sides > 1): the ``(C kh) x (N kw)`` matrix
        ``M[(c, i), (n, j)] = W[n, c, i, j]``. None for grouped, depthwise and transposed convs
        (and for ``"spatial"`` on other kernels)."""
        if kind not in ("channel", "spatial"):
            raise ValueError(f"kind={kind!r}: 'channel' or 'spatial'")
        if module.transposed or module.groups != 1:
            return None
        w = module.weight
        n, c, *kernel = w.shape
        if kind == "channel":
            return w.reshape(n, -1)
        if len(kernel) != 2 or min(kernel) < 2:
            return None
        kh, kw = kernel
        return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)

    def weight_from_rank_matrix(self, module: nn.Module, matrix: Tensor, kind: str = "channel") -> Tensor:
        """``matrix`` (shaped like :meth:`rank_matrix`) back in the weight's ``N x C x k...`` layout."""
        n, c, *kernel = module.weight.shape
        if kind == "channel":
            return matrix.reshape(module.weight.shape)
        kh, kw = kernel
        return matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3)

    def factorise(self, module: nn.Module, rank: int, *, kind: str = "channel") -> nn.Module | None:
        """Two convs computing the layer through a rank-``rank`` bottleneck (exact at full
        rank) from the SVD of :meth:`rank_matrix`; None where it is None (grouped, depthwise
        and transposed convs).

        ``"channel"``: ``W = U S V^T`` of the ``N x (C k...)`` matrix gives a ``k...`` conv
        ``C -> r`` (weights ``sqrt(S) V^T``, same stride/padding/dilation, no bias) then a 1x1
        conv ``r -> N`` (weights ``U sqrt(S)``, the original bias).

        ``"spatial"`` (Tai et al. 2016, the vertical/horizontal scheme TRP uses): the
        ``(C kh) x (N kw)`` matrix gives a ``kh x 1`` conv ``C -> r`` (from ``U sqrt(S)``) then
        a ``1 x kw`` conv ``r -> N`` (from ``sqrt(S) V^T``), with stride, padding and dilation
        split between the height and the width."""
        matrix = self.rank_matrix(module, kind)
        if matrix is None:
            return None
        w = module.weight
        n, c, *kernel = w.shape
        spatial = len(kernel)
        conv_cls = _CONVS[spatial - 1]
        make = {"device": w.device, "dtype": w.dtype, "padding_mode": module.padding_mode}
        left, right = svd_factors(matrix, rank)
        r = right.shape[0]
        if kind == "channel":
            first = conv_cls(c, r, module.kernel_size, stride=module.stride, padding=module.padding,
                             dilation=module.dilation, bias=False, **make)
            second = conv_cls(r, n, 1, bias=module.bias is not None, **make)
            first_w, second_w = right.reshape(r, c, *kernel), left.reshape(n, r, *([1] * spatial))
        else:
            kh, kw = kernel
            pad = module.padding
            pad_h, pad_w = (pad, pad) if isinstance(pad, str) else ((pad[0], 0), (0, pad[1]))
            first = conv_cls(c, r, (kh, 1), stride=(module.stride[0], 1), padding=pad_h,
                             dilation=(module.dilation[0], 1), bias=False, **make)
            second = conv_cls(r, n, (1, kw), stride=(1, module.stride[1]), padding=pad_w,
                              dilation=(1, module.dilation[1]), bias=module.bias is not None, **make)
            first_w = left.reshape(c, kh, r).permute(2, 0, 1).unsqueeze(-1)  # (r, C, kh, 1)
            second_w = right.reshape(r, n, kw).permute(1, 0, 2).unsqueeze(2)  # (N, r, 1, kw)
        return low_rank_pair(first, second, first_w, second_w, module.bias)

    def unfolds(self, module: nn.Module) -> bool:
        """Ungrouped, non-transposed 1-D/2-D convs with explicit zero padding."""
        return (not module.transposed and module.groups == 1 and len(module.kernel_size) <= 2
                and module.padding_mode == "zeros" and isinstance(module.padding, tuple))

    def unfold_input(self, module: nn.Module, x: Tensor) -> Tensor:
        """``F.unfold`` of a batched input into ``(batch * positions, C * k...)``; a 1-D conv
        is unfolded as a 2-D one of height 1."""
        if not self.unfolds(module):
            raise ValueError(f"cannot unfold the input of {module}")
        if x.ndim == 3 and len(module.kernel_size) == 1:
            x = x.unsqueeze(2)
            k, d, p, s = (1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), (1, *module.stride)
        elif x.ndim == 4 and len(module.kernel_size) == 2:
            k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
        else:
            raise ValueError(f"cannot unfold a {x.ndim}-D input of {type(module).__name__}")
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*k*k, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def widths(self, module: nn.Module) -> tuple[int, int] | None:
        """``(in_channels, out_channels)``."""
        return module.in_channels, module.out_channels

    def identity_weight(self, module: nn.Module) -> Tensor | None:
        """The kernel that copies input channel ``o`` to output channel ``o`` through its
        centre tap: a 1 at ``[o, o % (C / groups), centre...]`` (any grouping keeps channel
        ``o`` in its own group when ``in_channels == out_channels``). None for transposed
        convs, unequal widths, a stride other than 1, or a kernel without a centre tap
        aligned with the output position: an even size, or padding other than
        ``dilation * (k - 1) / 2`` in some dim (the output would shift or change size)."""
        if module.transposed or module.in_channels != module.out_channels or any(s != 1 for s in module.stride):
            return None
        k, d = module.kernel_size, module.dilation
        if any(n % 2 == 0 for n in k):
            return None
        pad = module.padding
        if pad == "valid":
            pad = (0,) * len(k)
        if pad != "same" and any(p != di * (n - 1) // 2 for p, di, n in zip(pad, d, k)):
            return None
        w = module.weight
        eye = torch.zeros_like(w)
        per_group = w.shape[1]
        out = torch.arange(w.shape[0], device=w.device)
        eye[(out, out % per_group, *(torch.full_like(out, n // 2) for n in k))] = 1
        return eye

    def resized(self, module: nn.Module, in_fraction: float, out_fraction: float) -> nn.Module | None:
        """The same conv class and configuration with scaled widths, kept multiples of
        ``groups``; a depthwise conv has one width (scaled by ``out_fraction``, its channel
        multiplier kept). None for transposed convs (not rebuilt)."""
        if module.transposed:
            return None
        g = module.groups
        attrs = self.snapshot_attrs(module)
        if _depthwise(attrs):  # one width (scaled by out_fraction), its multiplier kept
            cin = g = max(1, round(module.in_channels * out_fraction))
            cout = cin * _multiplier(attrs)
        else:
            cin = g * max(1, round(module.in_channels * in_fraction / g))
            cout = g * max(1, round(module.out_channels * out_fraction / g))
        return type(module)(cin, cout, module.kernel_size, module.stride, module.padding,  # type: ignore[call-arg]
                            module.dilation, g, module.bias is not None)
