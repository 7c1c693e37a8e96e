"""A fully connected layer split into independent partitions that run in parallel.

:class:`PartitionedLinear` is what :mod:`prunekit.methods.partition` puts in place of a large
``nn.Linear``: ``P`` ordinary linear blocks, block ``p`` reading the input features
``[start_p, start_p + length_p)`` and writing its own slice of the output; the output is the
blocks' outputs concatenated in block order. A block that reads the whole input is a column
(output) split of the original layer; one that reads only its own slice of the previous
partitioned layer's output makes the two layers block-diagonal (no data crosses partitions).

On CPU the blocks run on a shared pool of ``P`` worker threads (one per partition, each with
``threads`` intra-op threads), joined before the concatenation; PyTorch's kernels release the
GIL, so the matrix products overlap. Everything that records ops on the calling thread runs
the blocks one after another instead, with identical results: TorchScript/ONNX tracing and
export, ``torch.compile``/``torch.export``, and any active ``TorchFunctionMode`` or
``TorchDispatchMode`` (FLOP counting, prunekit's tracer), since such modes are thread-local
and would not see ops on a worker. ``parallel = False`` forces the sequential path.

>>> import torch
>>> layer = PartitionedLinear(6, [[0, 6], [0, 6]], [2, 2])
>>> x = torch.randn(3, 6)
>>> layer.parallel = False
>>> seq = layer(x)
>>> layer.parallel = True
>>> torch.equal(seq, layer(x)), tuple(seq.shape)
(True, (3, 4))
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PartitionedLinear", "worker_pool"]

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def worker_pool(workers: int, threads: int = 1) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` threads, each running PyTorch with ``threads``
    intra-op threads (set once per worker: the setting is per thread), created on first use
    and shared by every layer asking for the same pair."""
    key = (int(workers), int(threads))
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=key[0], thread_name_prefix=f"prunekit-partition-{key[0]}x{key[1]}",
                                      initializer=torch.set_num_threads, initargs=(key[1],))
            _POOLS[key] = pool
        return pool


def _recording() -> bool:
    """True when ops are being recorded or transformed on this thread (tracing, export,
    compilation, a torch function/dispatch mode): the blocks must then run here."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return True
    function_modes = getattr(torch._C, "_len_torch_function_stack", None)
    dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return bool((function_modes is not None and function_modes() > 0)
                or (dispatch_modes is not None and dispatch_modes() > 0))


class PartitionedLinear(nn.Module):
    """``P`` independent linear blocks over slices of the input, outputs concatenated.

    Args:
        in_features: width of the input's last dim.
        in_ranges: ``[start, length]`` of the input features each block reads.
        out_sizes: output width of each block (the output is their concatenation).
        bias: whether the blocks have biases.
        parallel: run the blocks on worker threads when nothing records ops (see the
            module docstring); a plain attribute, also a factory argument.
        threads: intra-op threads of each worker.

    ``blocks[p]`` is an ``nn.Linear(length_p, out_sizes[p])``; raises ValueError for a range
    outside the input or sizes that do not match.
    """

    def __init__(self, in_features: int, in_ranges: list[list[int]], out_sizes: list[int], bias: bool = True,
                 parallel: bool = True, threads: int = 1) -> None:
        super().__init__()
        if len(in_ranges) != len(out_sizes) or not out_sizes:
            raise ValueError(f"PartitionedLinear: {len(in_ranges)} input ranges for {len(out_sizes)} blocks")
        ranges = [(int(s), int(n)) for s, n in in_ranges]
        for p, (start, length) in enumerate(ranges):
            if start < 0 or length < 1 or start + length > in_features:
                raise ValueError(f"PartitionedLinear: block {p} reads [{start}, {start + length}) of "
                                 f"{in_features} input features")
        if any(int(o) < 1 for o in out_sizes) or int(threads) < 1:
            raise ValueError(f"PartitionedLinear: out_sizes {list(out_sizes)} and threads {threads} must be >= 1")
        self.in_features = int(in_features)
        self.out_features = int(sum(int(o) for o in out_sizes))
        self.in_ranges = ranges
        self.parallel = bool(parallel)
        self.threads = int(threads)
        self.blocks = nn.ModuleList(nn.Linear(n, int(o), bias=bias) for (_, n), o in zip(ranges, out_sizes))

    @property
    def partitions(self) -> int:
        """Number of blocks (partitions)."""
        return len(self.blocks)

    def _block(self, p: int, x: Tensor) -> Tensor:
        start, length = self.in_ranges[p]
        xs = x if (start, length) == (0, self.in_features) else x.narrow(-1, start, length)
        return self.blocks[p](xs)

    def runs_parallel(self, x: Tensor) -> bool:
        """Whether a forward on ``x`` would use the worker threads: ``parallel`` is on, there is
        more than one block, ``x`` is on the CPU and nothing records ops on this thread."""
        return self.parallel and len(self.blocks) > 1 and x.device.type == "cpu" and not _recording()

    def forward(self, x: Tensor) -> Tensor:
        """The blocks' outputs on their input slices of ``x`` (``(..., in_features)``),
        concatenated along the last dim; in parallel when :meth:`runs_parallel`."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"PartitionedLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        if self.runs_parallel(x):
            pool = worker_pool(len(self.blocks), self.threads)
            # Grad and inference mode are thread-local too: the workers take the caller's.
            grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

            def run(p: int) -> Tensor:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    return self._block(p, x)

            outs = [f.result() for f in [pool.submit(run, p) for p in range(len(self.blocks))]]
        else:
            outs = [self._block(p, x) for p in range(len(self.blocks))]
        return torch.cat(outs, dim=-1)

    def factory_args(self) -> dict[str, Any]:
        """The JSON arguments of factory ``partitioned_linear`` that rebuild this module."""
        return {"in_features": self.in_features, "in_ranges": [list(r) for r in self.in_ranges],
                "out_sizes": [b.out_features for b in self.blocks], "bias": self.blocks[0].bias is not None,
                "parallel": self.parallel, "threads": self.threads}

    def extra_repr(self) -> str:
        """Input width, blocks and execution mode."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, partitions={len(self.blocks)}, "
                f"parallel={self.parallel}, threads={self.threads}")
