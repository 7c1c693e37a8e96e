"""Handler of ``nn.PReLU``: one slope per channel (dim 1), or one shared slope."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from prunekit.handlers import LayerHandler, Put, register_handler


@register_handler
class PReLUHandler(LayerHandler):
    """Per-channel on dim 1 when it has several slopes; a single shared slope has no channels."""

    kinds = (nn.PReLU,)

    def _channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        # PReLU reads its channels from dim 1; inputs of fewer than 2 dims have none.
        return 1 if module.weight.numel() > 1 and ndim >= 2 else None

    def out_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """1 with per-channel slopes, else None."""
        return self._channel_dim(module, ndim)

    def in_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """The same dim as the output's."""
        return self._channel_dim(module, ndim)

    def weight_dims(self, module: nn.Module) -> tuple[int | None, int | None]:
        """``(0, None)`` with per-channel slopes, else ``(None, None)``."""
        return (0, None) if module.weight.numel() > 1 else (None, None)

    def fix_attrs(self, module: nn.Module, put: Put, previous: dict[str, Any] | None) -> None:
        """``num_parameters`` from the number of slopes."""
        put(module, "num_parameters", module.weight.numel())

    def slice(self, module: nn.Module, dim_kind: str, keep: Tensor) -> None:
        """Keep the slopes of the ``keep`` channels (``"out"`` and ``"in"`` are the same)."""
        if dim_kind not in ("out", "in"):
            raise ValueError(f"dim_kind={dim_kind!r}: 'out' or 'in'")
        if self.weight_dims(module)[0] is None:
            raise NotImplementedError("a PReLU with one shared slope has no channels to slice")
        self._slice_by_dims(module, {"weight": 0}, keep)
