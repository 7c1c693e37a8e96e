"""FLOPs of one recorded op from its traced shapes: the one formula residual blocks
(:mod:`prunekit.graph.residual`) and the cost model (:mod:`prunekit.allocate.cost`) share.

Counts are those of ``torch.utils.flop_counter`` (2 per multiply-add; element-wise,
normalisation and pooling ops count 0), computed from :attr:`OpRecord.in_shapes`, which
the tracer keeps for the ops in :data:`prunekit.graph.tracer.WEIGHTED_OPS`.
"""

from __future__ import annotations

import math

from prunekit.graph.tracer import OpRecord

__all__ = ["CONV_OPS", "mha_terms", "op_cost"]

CONV_OPS = frozenset({"conv1d", "conv2d", "conv3d"})
MATMUL_OPS = frozenset({"linear", "matmul", "mm", "bmm"})


def op_cost(op: OpRecord) -> tuple[int, int | None] | None:
    """``(FLOPs at the traced shapes, contracted dim of the first input or None)`` of an op
    a formula covers, None for any other op (or one whose shapes were not kept).

    The contracted dim is the one of the first input whose pruning scales the cost (a
    conv's channels, a matmul's last dim); it is None where the first input's channels do
    not (a depthwise conv, whose cost follows its outputs) or where the cost is only
    known whole (attention, ``addmm``/``baddbmm``).
    """
    s = op.in_shapes
    if not s or not op.out_shapes:
        return None
    out = math.prod(op.out_shapes[0])
    name = op.name
    if name in CONV_OPS:
        if len(s) < 2 or len(s[1]) < 3:
            return None
        w = s[1]
        # A depthwise conv's cost follows its output channels only (one input per output).
        return 2 * out * math.prod(w[1:]), (1 if w[1] > 1 else None)
    if name in MATMUL_OPS:
        k = s[1][-1] if name == "linear" and len(s) > 1 else s[0][-1]
        return 2 * out * k, -1
    if name in ("addmm", "baddbmm") and len(s) > 1:
        return 2 * out * s[1][-1], None  # (input, mat1, mat2): mat1's last dim is contracted
    if name == "scaled_dot_product_attention" and len(s) > 2:
        q, k, v = s[0], s[1], s[2]
        return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1]), None  # q @ k^T, then the weights @ v
    if name == "multi_head_attention_forward" and len(s) > 2:
        return sum(flops for flops, _ in mha_terms(op)), None
    return None


def mha_terms(op: OpRecord) -> list[tuple[int, tuple[str, ...]]]:
    """The FLOPs of an ``nn.MultiheadAttention`` call (op ``multi_head_attention_forward``) as
    terms ``(FLOPs at the traced shapes, the widths it is proportional to)``; widths are
    ``"query"``, ``"key"``, ``"value"`` (those inputs' last dims), ``"inner"`` (the q/k/v inner
    channels, :attr:`OpRecord.aux_labs`) and ``"out"`` (the output's last dim): the q, k, v
    and output projections, then ``q @ k^T`` and the weights ``@ v``."""
    q, k, v = op.in_shapes[0], op.in_shapes[1], op.in_shapes[2]  # (length, batch, width), unbatched (length, width)
    tgt, n, src = q[0], q[1] if len(q) == 3 else 1, k[0]
    inner_lab = op.aux_labs.get("inner")
    inner = inner_lab.shape[0] if inner_lab is not None else q[-1]
    out = op.out_shapes[0][-1]
    return [(2 * n * tgt * q[-1] * inner, ("query", "inner")), (2 * n * src * k[-1] * inner, ("key", "inner")),
            (2 * n * src * v[-1] * inner, ("value", "inner")), (4 * n * tgt * src * inner, ("inner",)),
            (2 * n * tgt * inner * out, ("inner", "out"))]
