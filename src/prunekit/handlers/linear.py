"""Handler of ``nn.Linear`` (and its subclasses): channels are the last dim."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from prunekit.handlers import LayerHandler, Put, low_rank_pair, register_handler, svd_factors


@register_handler
class LinearHandler(LayerHandler):
    """``y = x W^T + b`` over the last dim; ``weight`` is ``(out_features, in_features)``."""

    kinds = (nn.Linear,)
    has_filters = True

    def out_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """The last dim."""
        return ndim - 1

    def in_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """The last dim."""
        return ndim - 1

    def weight_dims(self, module: nn.Module) -> tuple[int | None, int | None]:
        """``(0, 1)``."""
        return 0, 1

    def fix_attrs(self, module: nn.Module, put: Put, previous: dict[str, Any] | None) -> None:
        """``in_features``/``out_features`` from the weight's shape."""
        w = module.weight
        if isinstance(w, Tensor):
            put(module, "in_features", w.shape[1])
            put(module, "out_features", w.shape[0])

    def flops(self, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        """``2 * in * out`` per input row (every dim but the last is a row)."""
        return 2 * math.prod(input_shape[:-1]) * module.weight.numel()

    def slice(self, module: nn.Module, dim_kind: str, keep: Tensor) -> None:
        """``"out"``: weight rows and bias; ``"in"``: weight columns."""
        dims = {"weight": 0, "bias": 0} if dim_kind == "out" else {"weight": 1} if dim_kind == "in" else None
        if dims is None:
            raise ValueError(f"dim_kind={dim_kind!r}: 'out' or 'in'")
        self._slice_by_dims(module, dims, keep)

    def rank_matrix(self, module: nn.Module, kind: str = "channel") -> Tensor | None:
        """``weight`` itself (``out x in``) for ``"channel"``; None for ``"spatial"``."""
        if kind not in ("channel", "spatial"):
            raise ValueError(f"kind={kind!r}: 'channel' or 'spatial'")
        return module.weight if kind == "channel" else None

    def weight_from_rank_matrix(self, module: nn.Module, matrix: Tensor, kind: str = "channel") -> Tensor:
        """``matrix`` unchanged (the weight is its own rank matrix)."""
        return matrix.reshape(module.weight.shape)

    def factorise(self, module: nn.Module, rank: int, *, kind: str = "channel") -> nn.Module | None:
        """``Linear(in, r, bias=False)`` then ``Linear(r, out)`` (with the original bias) from
        the SVD of ``weight`` (``out x in``): ``W = [U sqrt(S)] [sqrt(S) V^T]``. Only kind
        ``"channel"`` applies (``"spatial"`` gives None)."""
        w = self.rank_matrix(module, kind)
        if w is None:
            return None
        left, right = svd_factors(w, rank)
        r = right.shape[0]
        first = nn.Linear(w.shape[1], r, bias=False, device=w.device, dtype=w.dtype)
        second = nn.Linear(r, w.shape[0], bias=module.bias is not None, device=w.device, dtype=w.dtype)
        return low_rank_pair(first, second, right, left, module.bias)

    def unfolds(self, module: nn.Module) -> bool:
        """Always: every input row is a receptive field."""
        return True

    def unfold_input(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x`` as ``(rows, in_features)``."""
        return x.reshape(-1, x.shape[-1])

    def widths(self, module: nn.Module) -> tuple[int, int] | None:
        """``(in_features, out_features)``."""
        return module.in_features, module.out_features

    def resized(self, module: nn.Module, in_fraction: float, out_fraction: float) -> nn.Module | None:
        """A plain ``nn.Linear`` with scaled widths (at least 1) and the same bias setting."""
        cin = max(1, round(module.in_features * in_fraction))
        cout = max(1, round(module.out_features * out_fraction))
        return nn.Linear(cin, cout, bias=module.bias is not None)
