"""Runtime helpers shared by the tracer, measurement, recovery and persistence: calling a
model on example inputs, where it runs, switching its train/eval flags, atomic files.

``example_inputs`` throughout prunekit may be:

* a single ``torch.Tensor`` -> ``model(x)``
* a ``tuple`` or ``list`` of positional arguments -> ``model(*args)``
* a ``dict`` of keyword arguments -> ``model(**kwargs)``

Anything else is passed as the single positional argument. To pass one list or
tuple *as a single argument*, wrap it: ``(my_list,)``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit._perf import unique_modules

if TYPE_CHECKING:
    from prunekit.graph.meta import MetaStandIns


def call_model(model: nn.Module | Any, example_inputs: Any) -> Any:
    """Call ``model`` with ``example_inputs`` in any of the supported forms.

    A tensor is passed as the only positional argument, a tuple/list is unpacked
    as positional arguments, a dict is unpacked as keyword arguments; any other
    object is passed as the only positional argument.

    Returns:
        Whatever ``model(...)`` returns.
    """
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(example_inputs)


def call(model: nn.Module, example_inputs: Any, swapped: MetaStandIns | None = None) -> Any:
    """Call ``model`` on ``example_inputs`` (see :func:`call_model`); with ``swapped``
    (from :func:`prunekit.graph.meta.meta_tensors`) on the meta device instead, in which
    case the inputs must already be meta tensors (:func:`prunekit.graph.meta.to_meta`).
    The stand-ins are put in the modules' parameter/buffer dicts for the call (what
    ``torch.func.functional_call`` does, without its per-name module lookups) and the
    originals always restored."""
    if swapped is None:
        return call_model(model, example_inputs)
    old = [(store, key, store[key]) for store, key, _ in swapped.slots]
    try:
        for store, key, stand in swapped.slots:
            store[key] = stand
        return call_model(model, example_inputs)
    finally:
        for store, key, orig in old:
            store[key] = orig


def model_device(model: nn.Module) -> torch.device | None:
    """Return the device of the model's first parameter/buffer, or ``None`` if it has none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def infer_device(model: nn.Module, example_inputs: Any = None) -> torch.device:
    """The device a forward runs on: the model's, else the first input tensor's, else CPU."""
    dev = model_device(model)
    if dev is None:
        t = first_tensor(example_inputs)
        dev = t.device if t is not None else torch.device("cpu")
    return dev


def to_device(obj: Any, device: torch.device) -> Any:
    """Recursively move tensors in ``obj`` (tensor/tuple/list/dict) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def first_tensor(obj: Any) -> torch.Tensor | None:
    """Return the first tensor found depth-first in ``obj``, or ``None``."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        items: Any = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        return None
    for o in items:
        t = first_tensor(o)
        if t is not None:
            return t
    return None


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Put ``model`` in 'eval' or 'train' mode, restoring every module's flag afterwards.

    Flags are restored per submodule (not ``model.train(was_training)``), so mixed states
    such as a training model with frozen BatchNorm layers survive the block.

    Training mode keeps BatchNorm frozen (running statistics are never touched and batch-1
    inputs work) and keeps the stochastic regularisers (dropout, stochastic depth, drop
    path, drop block) in eval mode: they only scale values by a random mask of the input's
    own shape, so the channel flow is the same, and the training pass then differs from the
    eval pass only where the model's own code branches on ``self.training``.
    """
    modules = unique_modules(model)
    flags = [m.training for m in modules]
    train = mode == "train"
    try:
        if any(type(m).train is not nn.Module.train for m in modules):
            model.train(train)  # some module customises train(): let it
        else:
            for m in modules:  # the same flags without ~1 ms of recursive calls on big models
                m.__dict__["training"] = train
        if train:
            for m in modules:
                if isinstance(m, _FROZEN_IN_TRAINING) or type(m).__name__ in _MASK_REGULARISERS:
                    m.__dict__["training"] = False
        yield model
    finally:
        for m, flag in zip(modules, flags):
            m.__dict__["training"] = flag


_FROZEN_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
_MASK_REGULARISERS = frozenset({"StochasticDepth", "DropPath", "DropBlock2d", "DropBlock", "DropBlockFast2d"})


def default_file_mode() -> int:
    """Permission bits of a newly created file under the current umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that needs a file name (an
    exporter, a checker reading the file back); when the block succeeds, the file there
    becomes ``path`` so that ``path`` is always either the old or the complete new file.

    The temporary file lies in the same directory (so ``os.replace`` is a rename on one
    file system) with the usual permissions (``mkstemp`` makes owner-only files); after
    the block it is fsynced, renamed over ``path``, and the directory is fsynced so the
    rename survives a crash. On any error the temporary file is removed and the previous
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, default_file_mode())
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_replace(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Create ``path`` by calling ``write`` on a binary file so that ``path`` is always either
    the old or the complete new file (:func:`atomic_path`); returns it as a
    :class:`~pathlib.Path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (a ``str`` is UTF-8 encoded) to ``path`` atomically (:func:`atomic_replace`)."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_replace(path, lambda f: f.write(payload))


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
