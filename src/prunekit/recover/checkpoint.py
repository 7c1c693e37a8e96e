"""Atomic checkpoint files and capture/restore of every RNG that affects a training run."""

from __future__ import annotations

import logging
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.runtime import atomic_replace

__all__ = ["atomic_torch_save", "capture_rng_state", "load_checkpoint", "load_tensor_file", "restore_rng_state"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` so ``path`` is always either the old or the new file; return it.

    See :func:`prunekit.runtime.atomic_replace`: a same-directory temporary file, flushed and
    fsynced, renamed over ``path``; on any error the previous ``path`` is untouched.
    """
    return atomic_replace(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by the training loop onto the CPU and return its dict.

    Checkpoints hold only tensors and plain Python values, so ``weights_only=True`` loading
    (no arbitrary unpickling) is used; see :func:`load_tensor_file` for the errors.
    """
    return load_tensor_file(path)


def load_tensor_file(path: str | Path) -> Any:
    """``torch.load`` a file of tensors and plain Python values onto the CPU, unpickling nothing else.

    A file that holds other objects (a pickled module or class, any other pickle) raises
    ``ValueError`` saying it is refused, rather than torch's advice to turn ``weights_only``
    off, which would let the file run code; a truncated or corrupt file raises ``ValueError``
    saying so. Both name ``path``.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would precede our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        with path.open("rb") as f:
            head = f.read(4)
        # A PyTorch file is a zip archive; a bare pickle (0x80: protocol 2+) that torch's
        # restricted unpickler rejects holds objects, as does a zip naming a class ("global").
        if head[:1] == b"\x80" or (head == b"PK\x03\x04" and "global" in str(exc).lower()):
            raise ValueError(f"{path}: holds objects other than tensors, which are refused (loading them could "
                             "run code); save a state dict of tensors instead") from None
        raise ValueError(f"{path}: not a PyTorch tensor file (corrupt or of another format)") from None
    except (RuntimeError, EOFError) as exc:  # the zip reader's "failed finding central directory", an empty file
        raise ValueError(f"{path}: truncated or corrupt PyTorch file") from exc


def capture_rng_state() -> dict[str, Any]:
    """Return the states of Python's, numpy's and torch's (CPU and CUDA) global generators.

    numpy's state is stored as plain lists/ints (not an ndarray) so the checkpoint stays
    loadable with ``weights_only=True``.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states saved by :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                           len(cuda_states), torch.cuda.device_count())
