"""Handler of per-channel normalisations: batch, instance, group and layer norm, ``nn.RMSNorm``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from prunekit.handlers import LayerHandler, Put, register_handler

_BATCH = nn.modules.batchnorm._BatchNorm
_INSTANCE = nn.modules.instancenorm._InstanceNorm
# Norms over the trailing dims, whose affine tensors have ``normalized_shape``.
_TRAILING: tuple[type[nn.Module], ...] = (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


@register_handler
class NormHandler(LayerHandler):
    """Channels are dim 1 (batch/group norm; instance norm: dim 0 when unbatched) or the last
    dim (layer/RMS norm over one trailing dim). Affine tensors and running statistics are
    one entry per channel. Layer/RMS norms over several trailing dims have no channel dim."""

    kinds = (_BATCH, _INSTANCE, nn.GroupNorm, *_TRAILING)
    is_norm = True

    def _channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        if isinstance(module, _TRAILING):
            return ndim - 1 if len(module.normalized_shape) == 1 else None
        if isinstance(module, _INSTANCE) and ndim == module._get_no_batch_dim():
            return 0
        return 1

    def out_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """1, the last dim for layer/RMS norm, 0 for an unbatched instance norm."""
        return self._channel_dim(module, ndim)

    def in_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """The same dim as the output's."""
        return self._channel_dim(module, ndim)

    def weight_dims(self, module: nn.Module) -> tuple[int | None, int | None]:
        """``(0, None)``; ``(None, None)`` for a norm over several trailing dims."""
        if isinstance(module, _TRAILING) and len(module.normalized_shape) != 1:
            return None, None
        return 0, None

    def fix_attrs(self, module: nn.Module, put: Put, previous: dict[str, Any] | None) -> None:
        """``num_features`` (batch/instance, from the weight or running mean), ``num_channels``
        (group norm) or a 1-D ``normalized_shape`` (layer/RMS norm) from the tensors' length."""
        w = module.weight if isinstance(module.weight, Tensor) else None
        if isinstance(module, (_BATCH, _INSTANCE)):
            ref = w if w is not None else getattr(module, "running_mean", None)
            if ref is not None:
                put(module, "num_features", ref.shape[0])
        elif isinstance(module, nn.GroupNorm):
            if w is not None:
                put(module, "num_channels", w.shape[0])
        elif w is not None and len(module.normalized_shape) == 1:
            put(module, "normalized_shape", (w.shape[0],))

    def eval_affine(self, module: nn.Module) -> tuple[Tensor, Tensor] | None:
        """``(gamma / sqrt(var + eps), beta - mean * gamma / sqrt(var + eps))`` of a batch norm
        that normalises by its running statistics in eval mode (``track_running_stats``);
        None for other norms, which use their input's own statistics."""
        if not isinstance(module, _BATCH) or module.running_mean is None or module.running_var is None:
            return None
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias
        return scale, shift

    def absorb_input_scale(self, module: nn.Module, scale: Tensor) -> bool:
        """A batch norm with running statistics: ``mean / scale`` and ``(var + eps) / scale**2 -
        eps`` normalise ``x`` in eval mode exactly as the old statistics normalised ``x * scale``
        (in train mode, normalising by the batch, a per-channel scale cancels up to ``eps``).
        False for other norms and for a ``scale`` that is not positive everywhere."""
        if self.eval_affine(module) is None or not bool((scale > 0).all()):
            return False
        scale = scale.to(module.running_mean)
        module.running_mean.div_(scale)
        module.running_var.add_(module.eps).div_(scale * scale).sub_(module.eps)
        return True

    def slice(self, module: nn.Module, dim_kind: str, keep: Tensor) -> None:
        """Keep channels (the same for ``"out"`` and ``"in"``) of the affine tensors and running
        statistics. A group norm must still divide its channels into ``num_groups``."""
        if dim_kind not in ("out", "in"):
            raise ValueError(f"dim_kind={dim_kind!r}: 'out' or 'in'")
        if self.weight_dims(module)[0] is None:
            raise NotImplementedError(f"slicing {module}: no single channel dim")
        self._slice_by_dims(module, dict.fromkeys(("weight", "bias", "running_mean", "running_var"), 0), keep)
