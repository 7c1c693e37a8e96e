"""Runtime helpers shared by the tracer, measurement, recovery and persistence: calling a
model on example inputs, where it runs, switching its train/eval flags, atomic files and
atomic directories.

``example_inputs`` throughout prunekit may be:

* a single ``torch.Tensor`` -> ``model(x)``
* a ``tuple`` or ``list`` of positional arguments -> ``model(*args)``
* a ``dict`` of keyword arguments -> ``model(**kwargs)``

Anything else is passed as the single positional argument. To pass one list or
tuple *as a single argument*, wrap it: ``(my_list,)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit._perf import unique_modules

if TYPE_CHECKING:
    from prunekit.graph.meta import MetaStandIns


@dataclasses.dataclass(frozen=True)
class ModeInputs:
    """Example inputs that differ between eval and training mode: ``train`` is what the
    model takes in training mode (a torchvision detector's ``(images, targets)``), ``eval``
    what it takes otherwise (``(images,)``). Wherever prunekit runs a model in training
    mode (tracing, validation) it passes ``train``; everywhere else (FLOPs, latency,
    criteria, export) ``eval``.

    >>> import torch
    >>> x = ModeInputs(eval=(torch.zeros(1),), train=(torch.zeros(1), {"y": 1}))
    >>> len(inputs_for(x, "train")), len(inputs_for(x, "eval")), inputs_for(torch.zeros(2), "train").shape
    (2, 1, torch.Size([2]))
    """

    eval: Any
    train: Any


def inputs_for(example_inputs: Any, mode: str) -> Any:
    """The example inputs to run a model with in ``mode`` ('eval' or 'train'): the matching
    field of a :class:`ModeInputs`, any other inputs as they are."""
    if isinstance(example_inputs, ModeInputs):
        return example_inputs.train if mode == "train" else example_inputs.eval
    return example_inputs


def call_model(model: nn.Module | Any, example_inputs: Any) -> Any:
    """Call ``model`` with ``example_inputs`` in any of the supported forms.

    A tensor is passed as the only positional argument, a tuple/list is unpacked
    as positional arguments, a dict is unpacked as keyword arguments; any other
    object is passed as the only positional argument.

    Returns:
        Whatever ``model(...)`` returns.
    """
    if isinstance(example_inputs, ModeInputs):
        example_inputs = example_inputs.eval
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
    # A forward may cache tensors in plain attributes (torchvision's anchor generator keeps
    # ``cell_anchors`` moved to the input's device): on the meta device those caches would
    # outlive the call and break every later real forward, so each attribute that now holds
    # a meta tensor is put back as it was. Only those: other state a forward sets once
    # (transformers' flag that its output-capturing hooks are installed, the hooks
    # themselves) must stay, or the next forward sets it up a second time.
    attrs = [(m.__dict__, dict(m.__dict__)) for m in unique_modules(model)]
    try:
        for store, key, stand in swapped.slots:
            store[key] = stand
        return call_model(model, example_inputs)
    finally:
        for store, key, orig in old:
            store[key] = orig
        for d, saved in attrs:
            for key in [k for k, v in d.items() if saved.get(k, d) is not v and _holds_meta(v)]:
                if key in saved:
                    d[key] = saved[key]
                else:
                    del d[key]


def _holds_meta(value: Any) -> bool:
    """Whether ``value`` is a meta tensor or a list/tuple/dict holding one."""
    if isinstance(value, torch.Tensor):
        return value.device.type == "meta"
    if isinstance(value, (list, tuple)):
        return any(_holds_meta(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_meta(v) for v in value.values())
    return False


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
    if isinstance(obj, ModeInputs):
        return ModeInputs(to_device(obj.eval, device), to_device(obj.train, device))
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
    if isinstance(obj, ModeInputs):
        return first_tensor(obj.eval)
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


def output_tensors(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    """The tensors ``model`` returns on ``example_inputs`` (moved to its device), flattened
    in order, computed in eval mode without gradients (every module's flag restored)."""
    from torch.utils._pytree import tree_flatten

    with model_mode(model, "eval"), torch.no_grad():
        out = call_model(model, to_device(example_inputs, infer_device(model, example_inputs)))
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


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
    return 0o666 & ~_umask()


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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty directory next to ``path`` to write files into; when the block
    succeeds, that directory becomes ``path`` as a whole, so a reader (or a process after a
    crash) sees either the previous directory or the complete new one, never a mix.

    * The temporary directory is the sibling ``.<name>.tmp-<random>`` (same file system, so
      the switch is a rename). On any exception it is removed and ``path`` is untouched.
    * Entries of the previous directory that the block did not write are carried over
      (hard links, copies where the file system has none; symbolic links as links), so
      files someone else put there survive; the same-named entries the block wrote replace
      them. Temporary files of an interrupted atomic file write (``.*.tmp``) are dropped.
    * After the block every file and directory in it is fsynced; then, if ``path`` does not
      exist, the directory is renamed to it; otherwise ``path`` is renamed to
      ``.<name>.old-<random>``, the new directory to ``path``, and the old one deleted.
      Between those two renames ``path`` does not exist: :func:`readable_directory` gives
      readers the old one meanwhile, and if the writer dies there, the next
      ``atomic_directory`` on ``path`` (or :func:`recover_directory`) renames it back.
    * Leftovers of a killed writer (``.<name>.tmp-*``, ``.<name>.old-*``) are removed
      before writing. Two processes writing the same ``path`` at once are not supported.

    ``path`` may be a symbolic link to a directory: the directory it points to is switched
    and the link kept. A ``path`` that exists and is not a directory raises
    ``NotADirectoryError``.
    """
    target = _switch_target(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        # mkdtemp makes an owner-only directory; keep the replaced directory's permissions.
        os.chmod(tmp, os.stat(target).st_mode & 0o7777 if target.is_dir() else 0o777 & ~_umask())
        yield tmp
        _fsync_tree(tmp)
        if target.is_dir():
            _carry_over(target, tmp)
            _fsync_dir(tmp)
        _switch(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def readable_directory(path: str | os.PathLike[str]) -> Path:
    """The directory to read ``path`` from: ``path`` itself, or, when it is missing (or empty:
    recreated by someone) because an :func:`atomic_directory` writer is between its two
    renames or was killed there, the previous directory that writer moved aside."""
    target = _switch_target(path)
    olds = _siblings(target, "old") if _vacant(target) else []
    return max(olds, key=lambda p: p.stat().st_ctime) if olds else Path(path)


def recover_directory(path: str | os.PathLike[str]) -> None:
    """Undo what a killed :func:`atomic_directory` writer left next to ``path``: if it died
    between its two renames, the directory it moved aside becomes ``path`` again (also when
    ``path`` has been recreated empty since, e.g. by ``mkdir -p``); other temporary
    siblings are removed. Call it before creating ``path`` ahead of an atomic write."""
    target = _switch_target(path)
    olds = _siblings(target, "old")
    if olds and _vacant(target):
        newest = max(olds, key=lambda p: p.stat().st_ctime)
        if target.is_dir():
            target.rmdir()
        os.rename(newest, target)
        olds.remove(newest)
        _fsync_dir(target.parent)
    for stale in olds + _siblings(target, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _vacant(target: Path) -> bool:
    """``target`` does not exist or is an empty directory (not a symbolic link)."""
    if not os.path.lexists(target):
        return True
    return target.is_dir() and not target.is_symlink() and not any(target.iterdir())


def _umask() -> int:
    """The current umask (read by setting it, then restoring it)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _switch_target(path: str | os.PathLike[str]) -> Path:
    """The absolute directory entry to switch: the target of a symbolic link (so the link stays)."""
    return Path(os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path))


def _siblings(target: Path, kind: str) -> list[Path]:
    """The ``.<name>.<kind>-*`` entries next to ``target`` (``kind`` is ``tmp`` or ``old``)."""
    prefix = f".{target.name}.{kind}-"
    with contextlib.suppress(FileNotFoundError):
        return [target.parent / n for n in os.listdir(target.parent) if n.startswith(prefix)]
    return []


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (what the writer wrote)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            file = os.path.join(dirpath, name)
            if os.path.isfile(file) and not os.path.islink(file):
                fd = os.open(file, os.O_RDWR)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


def _carry_over(old: Path, new: Path) -> None:
    """Link (or copy) into ``new`` every entry of ``old`` that ``new`` lacks."""
    for entry in os.scandir(old):
        dst = new / entry.name
        if os.path.lexists(dst):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        elif not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            _link_or_copy(entry.path, str(dst))


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (instant, no extra space); copy where links are unsupported."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _switch(tmp: Path, target: Path) -> None:
    """Make the complete directory ``tmp`` be ``target`` (see :func:`atomic_directory`)."""
    if not target.exists():
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return
    old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
