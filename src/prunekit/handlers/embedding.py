"""Handler of ``nn.Embedding``: it produces ``embedding_dim`` channels, the last dim."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from prunekit.handlers import LayerHandler, Put, register_handler


@register_handler
class EmbeddingHandler(LayerHandler):
    """A lookup: ``weight`` is ``(num_embeddings, embedding_dim)``, its input indices carry no channels."""

    kinds = (nn.Embedding,)

    def out_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """The last dim."""
        return ndim - 1

    def weight_dims(self, module: nn.Module) -> tuple[int | None, int | None]:
        """``(1, None)``."""
        return 1, None

    def fix_attrs(self, module: nn.Module, put: Put, previous: dict[str, Any] | None) -> None:
        """``embedding_dim`` from the weight's columns."""
        put(module, "embedding_dim", module.weight.shape[1])

    def slice(self, module: nn.Module, dim_kind: str, keep: Tensor) -> None:
        """``"out"``: keep weight columns; an embedding has no input channels."""
        if dim_kind != "out":
            raise ValueError(f"dim_kind={dim_kind!r}: an embedding only has 'out' channels")
        self._slice_by_dims(module, {"weight": 1}, keep)
