"""Multi-head attention whose model width, head count and output width are independent.

``nn.MultiheadAttention`` (and ``F.multi_head_attention_forward``, which it calls) require the
q/k/v projections' width to equal the query's width (``embed_dim == num_heads * head_dim``)
and its packed ``in_proj_weight`` to be ``3E x E``. Pruning removes whole heads (the inner
width shrinks, ``head_dim`` stays) and, independently, channels of the embedding the module
reads and writes (the residual stream); after both, neither contract holds.
:class:`PrunedMultiheadAttention` is the exact equivalent that :mod:`prunekit.surgery` puts in
its place then (a :class:`~prunekit.plan.Replace` step, factory ``"multihead_attention"``):

* its parameters have the stock names and layouts (``in_proj_weight`` ``(3 * inner, E)``
  with the q, k, v thirds in this order, or ``q/k/v_proj_weight`` ``(inner, E|kdim|vdim)``;
  ``in_proj_bias``; ``bias_k``/``bias_v`` ``(1, 1, inner)``; ``out_proj`` ``inner -> out_dim``),
  so a plan's slices and a saved state dict apply to it unchanged;
* its forward runs the same torch calls around the attention as the stock module's (mask
  canonicalisation, the ``batch_first`` transposes) and the attention itself as one call of
  :func:`multi_head_attention_forward`, which has the stock function's name and signature and
  is overridable like it, so a trace or a shape check of the pruned model sees the same op
  sequence as the original's;
* ``_qkv_same_embed_dim`` is False: fused kernels that assume the stock widths
  (``nn.TransformerEncoderLayer``'s fast path tests this flag) never run on it. Whether its
  projection is packed is ``in_proj_weight is not None``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.overrides import handle_torch_function, has_torch_function

__all__ = ["PrunedMultiheadAttention", "multi_head_attention_forward"]


def multi_head_attention_forward(
    query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int, num_heads: int,
    in_proj_weight: Tensor | None, in_proj_bias: Tensor | None, bias_k: Tensor | None, bias_v: Tensor | None,
    add_zero_attn: bool, dropout_p: float, out_proj_weight: Tensor, out_proj_bias: Tensor | None,
    training: bool = True, key_padding_mask: Tensor | None = None, need_weights: bool = True,
    attn_mask: Tensor | None = None, use_separate_proj_weight: bool = False, q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None, v_proj_weight: Tensor | None = None, static_k: Tensor | None = None,
    static_v: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` without its width contract; returns ``(output,
    weights or None)`` as it does.

    Same arguments and results, except that the q/k/v inner width is the q projection's row
    count (``in_proj_weight.shape[0] // 3``, or ``q_proj_weight.shape[0]``), not the query's
    width, ``head_dim`` is that inner width over ``num_heads``, and the output width is
    ``out_proj_weight.shape[0]``. ``embed_dim_to_check`` is the query's width."""
    tensors = (query, key, value, in_proj_weight, in_proj_bias, bias_k, bias_v, out_proj_weight, out_proj_bias)
    if has_torch_function(tensors):
        return handle_torch_function(
            multi_head_attention_forward, tensors, query, key, value, embed_dim_to_check, num_heads, in_proj_weight,
            in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
            training=training, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=use_separate_proj_weight, q_proj_weight=q_proj_weight,
            k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight, static_k=static_k, static_v=static_v,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
    batched = query.dim() == 3
    if not batched:  # one sequence: run it as a batch of one
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, width = query.shape
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=query.dtype, check_other=False)
    if width != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {width}")
    if is_causal and attn_mask is None:
        raise RuntimeError("is_causal needs attn_mask (as in nn.MultiheadAttention)")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the causal flag alone tells scaled_dot_product_attention
    elif key_padding_mask is not None:
        is_causal = False  # the padding mask is merged into attn_mask below
    q, k, v = _project(query, key, value, in_proj_weight, in_proj_bias, use_separate_proj_weight,
                       q_proj_weight, k_proj_weight, v_proj_weight)
    inner = q.shape[-1]
    if inner % num_heads:
        raise AssertionError(f"inner width {inner} not divisible by num_heads {num_heads}")
    head_dim, v_head_dim = inner // num_heads, v.shape[-1] // num_heads
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:  # one learned key/value appended to every sequence
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    # (length, batch, heads * dim) -> (batch * heads, length, dim)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = static_k if static_k is not None else k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = static_v if static_v is not None else v.view(v.shape[0], bsz * num_heads, v_head_dim).transpose(0, 1)
    if add_zero_attn:  # one all-zero key/value appended
        k = torch.cat([k, k.new_zeros((bsz * num_heads, 1, k.shape[2]))], dim=1)
        v = torch.cat([v, v.new_zeros((bsz * num_heads, 1, v.shape[2]))], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    src_len = k.shape[1]
    if key_padding_mask is not None:
        padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(
            bsz * num_heads, 1, src_len)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    if not training:
        dropout_p = 0.0
    out_dim = out_proj_weight.shape[0]
    if need_weights:
        scores = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
        else:
            weights = torch.bmm(scores, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len * bsz, num_heads * v_head_dim)
        out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, out_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, v_head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, num_heads * v_head_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, out_dim)
    return (out if batched else out.squeeze(1)), None


def _project(query: Tensor, key: Tensor, value: Tensor, in_proj_weight: Tensor | None, in_proj_bias: Tensor | None,
             separate: bool, w_q: Tensor | None, w_k: Tensor | None, w_v: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The q, k, v projections: one packed product when query, key and value are one tensor
    (self-attention, as the stock function does), else one product each."""
    if separate:
        if w_q is None or w_k is None or w_v is None:
            raise AssertionError("use_separate_proj_weight is True but q/k/v_proj_weight is None")
        b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    if in_proj_weight is None:
        raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
    inner = in_proj_weight.shape[0] // 3
    if query is key and key is value:
        proj = F.linear(query, in_proj_weight, in_proj_bias)
        proj = proj.unflatten(-1, (3, inner)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return proj[0], proj[1], proj[2]
    ws = in_proj_weight.split(inner)
    bs = in_proj_bias.split(inner) if in_proj_bias is not None else (None, None, None)
    return F.linear(query, ws[0], bs[0]), F.linear(key, ws[1], bs[1]), F.linear(value, ws[2], bs[2])


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with independent widths: the query/embedding width
    ``embed_dim``, ``num_heads`` heads of ``head_dim`` each (the q/k/v inner width is their
    product), key and value widths ``kdim``/``vdim`` (with ``packed=False``: separate
    ``q/k/v_proj_weight``) and the output width ``out_dim`` (default ``embed_dim``). Computes
    exactly what the stock module computes with the same tensors (see the module docstring).

    >>> import torch
    >>> m = PrunedMultiheadAttention(6, 2, head_dim=4, out_dim=5, batch_first=True)
    >>> out, w = m(*(torch.randn(3, 7, 6),) * 3)
    >>> tuple(out.shape), tuple(w.shape), tuple(m.in_proj_weight.shape)
    ((3, 7, 5), (3, 7, 7), (24, 6))
    """

    def __init__(self, embed_dim: int, num_heads: int, *, head_dim: int, kdim: int | None = None,
                 vdim: int | None = None, out_dim: int | None = None, bias: bool = True, add_bias_kv: bool = False,
                 add_zero_attn: bool = False, dropout: float = 0.0, batch_first: bool = False, packed: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        nn.Module.__init__(self)  # not the stock __init__: it enforces the widths this class frees
        make = {"device": device, "dtype": dtype}
        kdim, vdim = kdim or embed_dim, vdim or embed_dim
        if packed and (kdim != embed_dim or vdim != embed_dim):
            raise ValueError(f"a packed in_proj_weight needs kdim == vdim == embed_dim ({kdim}, {vdim}, {embed_dim})")
        inner = num_heads * head_dim
        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        self.num_heads, self.head_dim, self.out_dim = num_heads, head_dim, out_dim or embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self._qkv_same_embed_dim = False  # keeps fused kernels, which assume stock widths, away
        if packed:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * inner, embed_dim), **make))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((inner, embed_dim), **make))
            self.k_proj_weight = nn.Parameter(torch.empty((inner, kdim), **make))
            self.v_proj_weight = nn.Parameter(torch.empty((inner, vdim), **make))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **make))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(inner, self.out_dim, bias=bias, **make)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros((1, 1, inner), **make))
            self.bias_v = nn.Parameter(torch.zeros((1, 1, inner), **make))
        else:
            self.bias_k = self.bias_v = None
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> "PrunedMultiheadAttention":
        """The equivalent of ``module`` (a stock or pruned one whose tensors may have any
        widths), sharing its tensors; ``head_dim`` is kept from the module (whole heads
        were removed), the other widths are read off its tensors."""
        new = cls(**cls.widths_of(module), device="meta")
        for name, t in list(module.named_parameters(recurse=True)):
            owner, leaf = (new.out_proj, name.split(".", 1)[1]) if name.startswith("out_proj.") else (new, name)
            owner._parameters[leaf] = t
        new.train(module.training)
        return new

    @staticmethod
    def widths_of(module: nn.MultiheadAttention) -> dict[str, Any]:
        """The constructor arguments describing ``module``'s tensors as they are."""
        packed = module.in_proj_weight is not None
        q = module.in_proj_weight if packed else module.q_proj_weight
        inner = q.shape[0] // 3 if packed else q.shape[0]
        head_dim = module.head_dim
        return {"embed_dim": int(q.shape[1]), "num_heads": inner // head_dim, "head_dim": head_dim,
                "kdim": int(q.shape[1] if packed else module.k_proj_weight.shape[1]),
                "vdim": int(q.shape[1] if packed else module.v_proj_weight.shape[1]),
                "out_dim": int(module.out_proj.weight.shape[0]), "bias": module.in_proj_bias is not None,
                "add_bias_kv": module.bias_k is not None, "add_zero_attn": bool(module.add_zero_attn),
                "dropout": float(module.dropout), "batch_first": bool(module.batch_first), "packed": packed}

    def factory_args(self) -> dict[str, Any]:
        """The JSON arguments of factory ``"multihead_attention"`` that rebuild this module."""
        return self.widths_of(self)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (always its general path, never a fused kernel)."""
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        swap = self.batch_first and query.dim() == 3
        if swap:  # to (length, batch, width), keeping "query is key is value" (self-attention) true
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, weights = multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.bias_k,
            self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=self.in_proj_weight is None, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(1, 0) if swap else out), weights
