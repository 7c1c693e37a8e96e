"""Handler of ``nn.MultiheadAttention``: channels are the last dim of query and output."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from prunekit.handlers import LayerHandler, Put, register_handler


@register_handler
class MultiheadAttentionHandler(LayerHandler):
    """``embed_dim`` is both its model width (query and output) and its inner q/k/v width,
    ``num_heads * head_dim``; keys and values may have other widths (``kdim``, ``vdim``).
    Its projections are ``in_proj_weight`` (``3E x E``) or ``q/k/v_proj_weight``, and the
    ``out_proj`` linear layer (a submodule, with its own handler)."""

    kinds = (nn.MultiheadAttention,)

    def out_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """The last dim."""
        return ndim - 1

    def in_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """The last dim of the query."""
        return ndim - 1

    def snapshot_attrs(self, module: nn.Module) -> dict[str, Any]:
        """``num_heads`` and ``head_dim``: which one a new width changes."""
        return {"num_heads": module.num_heads, "head_dim": module.head_dim}

    def fix_attrs(self, module: nn.Module, put: Put, previous: dict[str, Any] | None) -> None:
        """``embed_dim`` from the query projection's columns, ``kdim``/``vdim`` from the key
        and value projections'. A new width keeps ``head_dim`` (heads were removed) when it
        divides the width, else keeps ``num_heads`` when that divides it."""
        prev = previous or self.snapshot_attrs(module)
        if module._qkv_same_embed_dim:
            e = module.in_proj_weight.shape[1]
            kdim = vdim = e
        else:
            e, kdim, vdim = (getattr(module, f"{p}_proj_weight").shape[1] for p in "qkv")
        put(module, "embed_dim", e)
        put(module, "kdim", kdim)
        put(module, "vdim", vdim)
        if e % prev["head_dim"] == 0:
            put(module, "num_heads", e // prev["head_dim"])
            put(module, "head_dim", prev["head_dim"])
        elif e % prev["num_heads"] == 0:
            put(module, "head_dim", e // prev["num_heads"])

    def flops(self, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        """The q/k/v projections, ``q k^T``, the weighted sum of values and the output
        projection, 2 FLOPs per multiply-add. ``input_shape`` is the query's; keys are taken
        as long as the queries (self-attention), plus one for ``bias_k`` and one for
        ``add_zero_attn``."""
        e = module.embed_dim
        seq_dim = 0 if len(input_shape) == 2 else (1 if module.batch_first else 0)
        length = input_shape[seq_dim]
        rows = math.prod(input_shape[:-1])  # batch * length
        attended = length + (module.bias_k is not None) + bool(module.add_zero_attn)
        projections = rows * e * (e + module.kdim + module.vdim + e)
        attention = 2 * rows * attended * e  # q k^T and attn v: each rows x attended x E
        return 2 * projections + 2 * attention
