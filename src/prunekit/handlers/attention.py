"""Handler of ``nn.MultiheadAttention``: channels are the last dim of query and output;
inside, whole heads (see :func:`prunekit.graph.rules.mha`)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from prunekit.handlers import LayerHandler, Put, register_handler


@register_handler
class MultiheadAttentionHandler(LayerHandler):
    """The stock module's ``embed_dim`` is both its model width (query and output) and its
    inner q/k/v width, ``num_heads * head_dim``; keys and values may have other widths
    (``kdim``, ``vdim``). Its projections are ``in_proj_weight`` (``3E x E``) or
    ``q/k/v_proj_weight``, and the ``out_proj`` linear layer (a submodule, with its own
    handler). Pruning heads and the embedding independently breaks that contract: the module
    is then replaced by :class:`~prunekit.surgery.mha.PrunedMultiheadAttention` (a subclass,
    so this handler serves it too), whose widths are independent."""

    kinds = (nn.MultiheadAttention,)

    def out_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """The last dim."""
        return ndim - 1

    def in_channel_dim(self, module: nn.Module, ndim: int) -> int | None:
        """The last dim of the query."""
        return ndim - 1

    def snapshot_attrs(self, module: nn.Module) -> dict[str, Any]:
        """``num_heads`` and ``head_dim``: pruning removes whole heads, so ``head_dim`` stays."""
        return {"num_heads": module.num_heads, "head_dim": module.head_dim}

    def fix_attrs(self, module: nn.Module, put: Put, previous: dict[str, Any] | None) -> None:
        """``embed_dim`` (the query's width) from the q projection's columns, ``kdim``/``vdim``
        from the key and value projections', ``num_heads`` from the q/k/v inner width (the q
        projection's rows) over the kept ``head_dim`` (heads go whole), and, on a
        :class:`~prunekit.surgery.mha.PrunedMultiheadAttention`, ``out_dim`` from ``out_proj``.
        A stock module whose widths no longer agree gets the same values and is replaced (see
        :meth:`replacement`)."""
        prev = previous or self.snapshot_attrs(module)
        widths = _widths(module)
        for key in ("embed_dim", "kdim", "vdim"):
            put(module, key, widths[key])
        head_dim = prev["head_dim"]
        if widths["inner"] % head_dim == 0:
            put(module, "num_heads", widths["inner"] // head_dim)
            put(module, "head_dim", head_dim)
        if hasattr(module, "out_dim"):
            put(module, "out_dim", module.out_proj.weight.shape[0])

    def replacement(self, module: nn.Module) -> nn.Module | None:
        """A :class:`~prunekit.surgery.mha.PrunedMultiheadAttention` holding ``module``'s tensors
        when they break the stock contract (q/k/v inner width, output width and query width all
        equal to ``embed_dim``, with ``embed_dim == num_heads * head_dim``); None when the
        stock module still runs them (or ``module`` is a pruned one, which runs any widths)."""
        from prunekit.surgery.mha import PrunedMultiheadAttention

        if isinstance(module, PrunedMultiheadAttention):
            return None
        w = _widths(module)
        e = w["embed_dim"]
        if w["inner"] == e == module.out_proj.weight.shape[0] == module.num_heads * module.head_dim:
            return None
        return PrunedMultiheadAttention.from_module(module)

    def flops(self, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        """The q/k/v projections, ``q k^T``, the weighted sum of values and the output
        projection, 2 FLOPs per multiply-add. ``input_shape`` is the query's; keys are taken
        as long as the queries (self-attention), plus one for ``bias_k`` and one for
        ``add_zero_attn``."""
        w = _widths(module)
        e, inner, out = w["embed_dim"], w["inner"], module.out_proj.weight.shape[0]
        seq_dim = 0 if len(input_shape) == 2 else (1 if module.batch_first else 0)
        length = input_shape[seq_dim]
        rows = math.prod(input_shape[:-1])  # batch * length
        attended = length + (module.bias_k is not None) + bool(module.add_zero_attn)
        projections = rows * inner * (e + w["kdim"] + w["vdim"] + out)
        attention = 2 * rows * attended * inner  # q k^T and attn v: each rows x attended x inner
        return 2 * projections + 2 * attention


def _widths(module: nn.Module) -> dict[str, int]:
    """The widths ``module``'s tensors have: ``embed_dim`` (query), ``kdim``, ``vdim`` and the
    q/k/v ``inner`` width (the q projection's rows)."""
    if module.in_proj_weight is not None:  # packed: one weight for q, k and v of one width
        e = module.in_proj_weight.shape[1]
        return {"embed_dim": e, "kdim": e, "vdim": e, "inner": module.in_proj_weight.shape[0] // 3}
    q, k, v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    return {"embed_dim": q.shape[1], "kdim": k.shape[1], "vdim": v.shape[1], "inner": q.shape[0]}
