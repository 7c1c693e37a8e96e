"""Residual blocks found in a traced pass: a sub-path joined by an add to its own input.

The tracer records, for every op, the value ids of its tensor inputs and outputs, and for
every module call its inputs, outputs and the range of ops it ran. An ``add`` of two
activations A and B is a residual join when, walking backwards from the operands through
the ops of one enclosing module call, B is an ancestor of A (identity shortcut: the branch
is the ops from B to A) or both reach a common value X (projection shortcut: the branch
and the shortcut are the ops from X to each operand; the longer path is the branch).
"""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.graph.opcost import op_cost
from prunekit.graph.tracer import ModuleCall, OpRecord

__all__ = ["ResidualBlock", "find_blocks"]


@dataclass(frozen=True)
class ResidualBlock:
    """One residual join ``out = branch(x) + shortcut(x)`` of a traced pass.

    Attributes:
        name: qualified name of the smallest module whose call contains the branch and the
            add (torchvision resnet: ``layer1.0``; ``""`` for the root model).
        branch_modules: leaf modules executed on the branch, in execution order.
        shortcut_modules: leaf modules on the shortcut path (empty for an identity shortcut).
        add_op: index of the ``add`` op in the traced pass (:class:`OpRecord.index`).
        identity_shortcut: True when the block input itself is added.
        params: parameters of the branch modules (with their submodules' parameters, such as
            ``nn.MultiheadAttention.out_proj``, which its call uses without calling it).
        flops: FLOPs of the branch's convolutions, linear layers, matrix products and
            attention (2 per multiply-add; element-wise and normalisation ops count 0).
        branch_ops: indices of the ops on the branch (including parameter-only multiplies
            such as a layer scale, not counting the add).
    """

    name: str
    branch_modules: tuple[str, ...]
    shortcut_modules: tuple[str, ...]
    add_op: int
    identity_shortcut: bool
    params: int
    flops: int
    branch_ops: tuple[int, ...]


def find_blocks(ops: list[OpRecord], calls: list[ModuleCall], module_params: dict[str, int]) -> list[ResidualBlock]:
    """Residual blocks of one traced pass (``ops`` and ``calls`` of one mode), in order of
    their add ops; ``module_params`` gives each module's own parameter count
    (:attr:`TraceState.module_params`).

    An add whose branch runs no module (element-wise arithmetic such as a GELU's tanh
    approximation ``x + 0.044715 * x**3``) is not a block.
    """
    subtree_params: dict[str, int] = {}
    for name, n in module_params.items():
        parts = name.split(".") if name else []
        for k in range(len(parts) + 1):
            prefix = ".".join(parts[:k])
            subtree_params[prefix] = subtree_params.get(prefix, 0) + n
    producer: dict[int, int] = {}
    for op in ops:
        for v in op.out_values:
            producer[v] = op.index
    has_child = {c.parent for c in calls}
    leaves = [c for c in calls if c.index not in has_child]
    # The innermost call running each op: the op's scope, widened to enclosing calls when
    # the operands only meet further out.
    innermost = [-1] * len(ops)
    for c in calls:  # pre-order: a nested call overwrites its parent's ops
        for i in range(c.first_op, c.last_op + 1):
            innermost[i] = c.index
    blocks = []
    for op in ops:
        if op.name != "add":
            continue
        a_b = [v for v in op.in_values if v >= 0]
        if len(a_b) != 2 or a_b[0] == a_b[1]:
            continue  # a bias or constant add, or x + x
        scope = innermost[op.index]
        while scope >= 0:
            joined, block = _join(op, a_b[0], a_b[1], calls[scope], ops, producer, leaves, subtree_params)
            if joined:  # decided here: operands that meet inside a call are not re-read further out
                if block is not None:
                    blocks.append(block)
                break
            scope = calls[scope].parent
    return blocks


def _join(op: OpRecord, a: int, b: int, scope: ModuleCall, ops: list[OpRecord], producer: dict[int, int],
          leaves: list[ModuleCall], subtree_params: dict[str, int]) -> tuple[bool, ResidualBlock | None]:
    """Whether the operands ``a``, ``b`` of ``op`` meet within the call ``scope``, and the
    block they join there (None when its branch runs no module); ``subtree_params``:
    parameters of each module with its submodules."""
    lo = scope.first_op
    anc_a, anc_b = _ancestors(a, lo, ops, producer), _ancestors(b, lo, ops, producer)
    if b in anc_a or a in anc_b:
        source, branch_end = (b, a) if b in anc_a else (a, b)
        branch = _between(source, branch_end, ops, producer, lo)
        shortcut: list[int] = []
        identity = True
    else:
        common = anc_a & anc_b
        if not common:
            return False, None
        source = max(common, key=lambda v: producer.get(v, -1))  # the latest value both reach
        branch, shortcut = _between(source, a, ops, producer, lo), _between(source, b, ops, producer, lo)
        if len(shortcut) > len(branch):
            branch, shortcut = shortcut, branch
        identity = False
    branch_modules = _modules_on(branch, scope, leaves, ops, op.index)
    if not branch_modules:
        return True, None
    return True, ResidualBlock(
        name=scope.name,
        branch_modules=branch_modules,
        shortcut_modules=_modules_on(shortcut, scope, leaves, ops, op.index),
        add_op=op.index,
        identity_shortcut=identity,
        params=sum(subtree_params.get(m, 0) for m in branch_modules),
        flops=sum(_flops(ops[i]) for i in branch),
        branch_ops=tuple(branch),
    )


def _ancestors(value: int, lo: int, ops: list[OpRecord], producer: dict[int, int]) -> set[int]:
    """``value`` and every value it was computed from by ops at index ``lo`` or later."""
    seen = {value}
    todo = [value]
    while todo:
        p = producer.get(todo.pop(), -1)
        if p < lo:
            continue  # made before the scope (its input) or not by an op (a model input)
        for v in ops[p].in_values:
            if v >= 0 and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen


def _between(source: int, end: int, ops: list[OpRecord], producer: dict[int, int], lo: int) -> list[int]:
    """Indices of the ops on a path from value ``source`` to value ``end`` (ops from index ``lo``)."""
    stop = producer.get(end, -1)
    start = max(lo, producer.get(source, -1) + 1)
    reached = {source}  # values computed from ``source``
    forward = []
    for i in range(start, stop + 1):
        o = ops[i]
        if any(v in reached for v in o.in_values):
            reached.update(o.out_values)
            forward.append(i)
    # Keep the ops ``end`` depends on: walk back over the forward ops only.
    needed = {end}
    path = []
    for i in reversed(forward):
        o = ops[i]
        if any(v in needed for v in o.out_values):
            needed.update(v for v in o.in_values if v in reached)
            path.append(i)
    return path[::-1]


def _modules_on(path: list[int], scope: ModuleCall, leaves: list[ModuleCall], ops: list[OpRecord],
                add_op: int) -> tuple[str, ...]:
    """Leaf modules called inside ``scope`` before the add whose ops lie on ``path``, plus
    op-less ones (stochastic depth in eval, an identity) that pass a path value through."""
    on = set(path)
    values = {v for i in path for v in ops[i].out_values}
    names: list[str] = []
    for c in leaves:
        if not scope.index < c.index < scope.stop or c.first_op > add_op:
            continue
        if c.last_op >= c.first_op:
            hit = any(i in on for i in range(c.first_op, c.last_op + 1))
        else:
            hit = bool(c.in_values) and all(v in values for v in c.in_values + c.out_values)
        if hit and c.name not in names:
            names.append(c.name)
    return tuple(names)


def _flops(op: OpRecord) -> int:
    """FLOPs of one op (:func:`prunekit.graph.opcost.op_cost`), 0 for ops it does not count."""
    cost = op_cost(op)
    return cost[0] if cost is not None else 0
