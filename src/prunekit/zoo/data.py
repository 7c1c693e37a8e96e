"""Data sets for training and evaluating pruned models, selected by a short spec string.

``load_dataset("digits")`` needs nothing on disk (scikit-learn ships the images); the other
specs name a local path (``"cifar10:/data/cifar"``, ``"fashion-mnist:/usr/share/datasets/
fashion-mnist"``, ...). Nothing is ever downloaded: a missing data set raises
``FileNotFoundError`` with one line saying what to put where.
"""

from __future__ import annotations

import logging
import os
import random
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from prunekit.zoo.tensor_data import TensorImageDataset, balanced_subset_indices, channel_stats, read_idx

__all__ = ["DATASET_NAMES", "DatasetInfo", "TensorImageDataset", "load_dataset", "make_loader", "read_idx"]

logger = logging.getLogger(__name__)

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

# Published per-channel statistics of the full training sets, so that a partial copy (e.g.
# the cifar10-partial.npz) normalises exactly like the full set would.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DatasetInfo:
    """A loaded data set plus what a model needs to know about it.

    ``dataset`` yields ``(float image tensor (in_chans, image_size, image_size), int label)``,
    already normalised with ``mean``/``std`` (per channel, in [0, 1] pixel units).
    """

    dataset: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    name: str
    split: str = "train"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __len__(self) -> int:
        """Return the number of examples in ``dataset``."""
        return len(self.dataset)  # type: ignore[arg-type]


# Fixed, so the held-out validation images never depend on the user's ``seed``: every run
# that asks for the same ``val_size`` tunes on the same images.
VAL_SEED = 20261201


def _check_split(split: str) -> str:
    """Return ``split`` if it is one of "train" / "val" / "test", else raise ValueError."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
    return split


def _crop_pad(size: int) -> int:
    """Padding for random-crop augmentation: 4 px at 32 px (the CIFAR standard), scaled to the size."""
    return max(1, size // 8)


def _from_arrays(
    name: str, x: np.ndarray, y: np.ndarray, *, split: str, augment: bool, flip: bool, num_classes: int,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None, stats_from: np.ndarray | None,
    image_size: int | None, classes: list[str] | None = None,
) -> DatasetInfo:
    """Wrap NCHW arrays in a TensorImageDataset; ``stats`` or stats computed on ``stats_from``."""
    images = torch.from_numpy(np.ascontiguousarray(x))
    if stats is None:
        ref = images if stats_from is None else torch.from_numpy(np.ascontiguousarray(stats_from))
        stats = channel_stats(ref)
    native = int(images.shape[-1])
    size = image_size or native
    ds = TensorImageDataset(
        images, torch.from_numpy(np.asarray(y).astype(np.int64)), mean=stats[0], std=stats[1], augment=augment,
        flip=flip, pad=_crop_pad(size), size=None if size == native else size, classes=classes,
    )
    return DatasetInfo(ds, num_classes, int(images.shape[1]), size, name, split, tuple(stats[0]), tuple(stats[1]))


def _to_nchw(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Return images as NCHW: (N,H,W) gets a channel axis; NHWC is detected by a last axis of 1, 3 or 4."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{path}: {key} must be (N,H,W), (N,C,H,W) or (N,H,W,C), got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.transpose(0, 3, 1, 2)
    return x


def _load_digits(split: str, augment: bool, image_size: int | None) -> DatasetInfo:
    """scikit-learn's 8x8 digits: fixed stratified 80/20 split (seed 0), scaled to [0, 1], resized."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_all = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    y_all = bunch.target.astype(np.int64)
    # The split never depends on the user's seed, so test accuracy is comparable across runs.
    idx_train, idx_test = train_test_split(np.arange(len(y_all)), test_size=0.2, stratify=y_all, random_state=0)
    size = image_size or 16
    if size != 8:
        x_all = F.interpolate(x_all, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    idx = idx_train if split == "train" else idx_test
    stats = channel_stats(x_all[idx_train])
    return _from_arrays(
        "digits", x_all[idx].numpy(), y_all[idx], split=split, augment=augment, flip=False, num_classes=10,
        stats=stats, stats_from=None, image_size=None, classes=[str(i) for i in range(10)],
    )


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """``np.load`` an ``.npz`` archive without pickles; anything else (garbage, a truncated
    archive, a single ``.npy``, a pickle) is a ValueError naming ``path``, not numpy's advice
    to allow pickles."""
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz archive (truncated, corrupt or another format; "
                         f"pickled data is refused)") from exc
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array, not an .npz archive with x_train, y_train, x_test, y_test")
    return z


def _npz_array(z: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """Array ``key`` of an open archive; a damaged member or an object (pickled) array is a
    ValueError naming the file and the key."""
    try:
        return z[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise ValueError(f"{path}: array {key!r} cannot be read (truncated or corrupt)") from exc
        raise ValueError(f"{path}: array {key!r} holds Python objects (pickled data), which are refused") from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path}: array {key!r} cannot be read (truncated or corrupt)") from exc


def _load_npz_arrays(path: Path, split: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, list[str] | None]:
    """Read x_/y_ arrays of one split from an ``.npz``; return (x NCHW, y, x_train NCHW, num_classes, classes)."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no .npz file at {path}; pass --data {name}:FILE.npz with keys x_train, y_train, x_test, y_test")
    with _open_npz(path) as z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; found {sorted(z.files)}")
        key = "train" if split == "train" else "test"
        x = _to_nchw(_npz_array(z, f"x_{key}", path), f"x_{key}", path)
        y = _npz_array(z, f"y_{key}", path).astype(np.int64).reshape(-1)
        x_train = x if key == "train" else _to_nchw(_npz_array(z, "x_train", path), "x_train", path)
        num_classes = int(max(_npz_array(z, "y_train", path).max(), _npz_array(z, "y_test", path).max())) + 1
        classes = [str(c) for c in _npz_array(z, "classes", path)] if "classes" in z.files else None
    if len(x) != len(y):
        raise ValueError(f"{path}: x_{key} has {len(x)} images but y_{key} has {len(y)} labels")
    return x, y, x_train, num_classes, classes


def _load_cifar(name: str, path: Path, split: str, augment: bool, image_size: int | None) -> DatasetInfo:
    """CIFAR-10/100 from torchvision's folder layout or from an ``.npz`` in the cifar10-partial layout."""
    num_classes = 10 if name == "cifar10" else 100
    if path.suffix == ".npz":
        x, y, _, found, classes = _load_npz_arrays(path, split, name)
        num_classes = max(num_classes, found)
    else:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if name == "cifar10" else CIFAR100
        folder = cls.base_folder
        root = path.parent if path.name == folder else path
        if not (root / folder).is_dir():
            raise FileNotFoundError(
                f"{name}: no {folder}/ in {path}; unpack the CIFAR python tarball there "
                f"or pass --data {name}:FILE.npz (x_train NHWC uint8, y_train, x_test, y_test)"
            )
        try:
            tv = cls(root=str(root), train=split == "train", download=False)
        except RuntimeError as exc:  # torchvision's md5 check failed: missing or truncated batch files
            raise FileNotFoundError(f"{name}: {root / folder} is incomplete or corrupt ({exc})") from exc
        x, y, classes = tv.data.transpose(0, 3, 1, 2), np.asarray(tv.targets), list(tv.classes)
    return _from_arrays(
        name, x, y, split=split, augment=augment, flip=True, num_classes=num_classes, stats=_STATS[name],
        stats_from=None, image_size=image_size, classes=classes,
    )


def _find_idx(path: Path, stem: str) -> Path | None:
    """Find ``stem`` or ``stem.gz`` in ``path`` or torchvision's ``*/raw`` layout; None if absent."""
    dirs = [path, path / "raw", path / "FashionMNIST" / "raw", path / "MNIST" / "raw"]
    variants = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    for d in dirs:
        for v in variants:
            if (d / v).is_file():
                return d / v
    return None


def _load_idx_set(name: str, path: Path, split: str, augment: bool, image_size: int | None) -> DatasetInfo:
    """MNIST / Fashion-MNIST from the four original IDX files, read with numpy."""
    img_stem, lbl_stem = _IDX_FILES[split]
    found = {}
    for stem in (img_stem, lbl_stem):
        f = _find_idx(path, stem)
        if f is None:
            hint = "install the Debian package dataset-fashion-mnist or " if name == "fashion-mnist" else ""
            raise FileNotFoundError(f"{name}: no {stem}(.gz) in {path}; {hint}pass --data {name}:DIR")
        found[stem] = f
    x, y = read_idx(found[img_stem]), read_idx(found[lbl_stem]).astype(np.int64)
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"{name}: {found[img_stem]} has shape {x.shape}, labels {y.shape}; expected (N,H,W) and (N,)")
    return _from_arrays(
        name, x[:, None], y, split=split, augment=augment, flip=False, num_classes=10, stats=_STATS[name],
        stats_from=None, image_size=image_size, classes=None,
    )


def _load_npz(path: Path, split: str, augment: bool, image_size: int | None) -> DatasetInfo:
    """Generic arrays; mean/std are measured on x_train, flips only for 3-channel images."""
    x, y, x_train, num_classes, classes = _load_npz_arrays(path, split, "npz")
    return _from_arrays(
        "npz", x, y, split=split, augment=augment, flip=x.shape[1] == 3, num_classes=num_classes, stats=None,
        stats_from=x_train, image_size=image_size, classes=classes,
    )


def _load_imagefolder(path: Path, split: str, augment: bool, image_size: int | None) -> DatasetInfo:
    """torchvision ImageFolder with PIL transforms (files are decoded anyway, so PIL is no extra cost)."""
    from torchvision import datasets, transforms

    if not path.is_dir():
        raise FileNotFoundError(f"imagefolder: no directory {path}; pass --data imagefolder:DIR with one subfolder per class")
    names = ("train",) if split == "train" else ("val", "test")
    root = next((path / n for n in names if (path / n).is_dir()), path)
    if root == path and split != "train" and (path / "train").is_dir():
        raise FileNotFoundError(f"imagefolder: {path} has train/ but no val/ or test/ for split={split!r}")
    size = image_size or 224
    mean, std = _STATS["imagenet"]
    if augment:
        tf = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        tf = [transforms.Resize(int(round(size * 256 / 224))), transforms.CenterCrop(size)]
    tf += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    ds = datasets.ImageFolder(str(root), transform=transforms.Compose(tf))
    return DatasetInfo(ds, len(ds.classes), 3, size, "imagefolder", split, mean, std)


DATASET_NAMES = ("digits", "cifar10", "cifar100", "fashion-mnist", "mnist", "imagefolder", "npz")


def load_dataset(
    spec: str,
    *,
    split: str = "train",
    augment: bool | None = None,
    subset: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    val_size: int = 0,
) -> DatasetInfo:
    """Load the data set named by ``spec`` (``"NAME"`` or ``"NAME:PATH"``) and return a DatasetInfo.

    ``split`` is ``"train"``, ``"val"`` or ``"test"``. With ``val_size=N > 0`` a class-balanced
    set of ``N // num_classes`` images per class is held out of the training files (chosen
    with the fixed :data:`VAL_SEED`, whatever ``seed`` is): ``"val"`` returns exactly those,
    unaugmented, and ``"train"`` returns the rest, so hyper-parameters can be tuned without
    touching the test split. Without ``val_size``, ``"val"`` is an error except for
    ``imagefolder``, whose ``val/`` folder it reads.

    ``augment=None`` means "on for the train split": random crop with zero padding (4 px at
    32 px) for every in-memory set, plus a horizontal flip for colour sets (CIFAR, colour
    npz, imagefolder) but never for digits/MNIST-like ones. ``subset=N`` keeps a class-balanced
    subset of exactly ``N // num_classes`` examples per class chosen by ``seed``.
    ``image_size`` resizes (bilinear); digits default to 16 px (upsampled from 8).
    """
    name, _, arg = spec.partition(":")
    name = name.strip().lower().replace("_", "-")
    split = _check_split(split)
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    if split == "val" and not val_size and name != "imagefolder":
        raise ValueError(f"{name}: split='val' is carved from the training split; pass val_size > 0 "
                         "(the test split is split='test')")
    # With val_size the validation images come from the training files, without augmentation.
    source = "train" if split == "val" and val_size else ("test" if split == "val" else split)
    aug = (split == "train") if augment is None else bool(augment)
    path = Path(os.path.expanduser(arg)) if arg else None
    if name == "fashion-mnist" and path is None:
        path = Path(FASHION_MNIST_DEFAULT_DIR)
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {spec!r}; valid names: {', '.join(DATASET_NAMES)} (as NAME or NAME:PATH)")
    if name != "digits" and path is None:
        raise ValueError(f"{name} needs a path: pass --data {name}:PATH")
    folder = "val" if name == "imagefolder" and split == "val" and not val_size else source
    loaders: dict[str, Callable[[], DatasetInfo]] = {
        "digits": lambda: _load_digits(source, aug, image_size),
        "cifar10": lambda: _load_cifar("cifar10", path, source, aug, image_size),  # type: ignore[arg-type]
        "cifar100": lambda: _load_cifar("cifar100", path, source, aug, image_size),  # type: ignore[arg-type]
        "fashion-mnist": lambda: _load_idx_set("fashion-mnist", path, source, aug, image_size),  # type: ignore[arg-type]
        "mnist": lambda: _load_idx_set("mnist", path, source, aug, image_size),  # type: ignore[arg-type]
        "imagefolder": lambda: _load_imagefolder(path, folder, aug, image_size),  # type: ignore[arg-type]
        "npz": lambda: _load_npz(path, source, aug, image_size),  # type: ignore[arg-type]
    }
    info = loaders[name]()
    if val_size and split != "test":
        held_out = balanced_subset_indices(_targets(info.dataset), val_size, info.num_classes, VAL_SEED)
        keep = held_out if split == "val" else np.setdiff1d(np.arange(len(info)), held_out)
        info = _restrict(info, keep, split)
    if subset is not None:
        info = _take_subset(info, subset, seed)
    logger.debug("loaded %s/%s: %d examples, %d classes", info.name, split, len(info.dataset), info.num_classes)  # type: ignore[arg-type]
    return info


def _targets(ds: Dataset) -> np.ndarray:
    """Class labels of a loaded data set (TensorImageDataset, ImageFolder or a Subset of one)."""
    if isinstance(ds, Subset):
        return np.asarray(_targets(ds.dataset))[np.asarray(ds.indices)]
    return np.asarray(ds.targets.cpu() if isinstance(ds.targets, torch.Tensor) else ds.targets)  # type: ignore[attr-defined]


def _restrict(info: DatasetInfo, idx: np.ndarray, split: str | None = None) -> DatasetInfo:
    """Return ``info`` holding only the examples ``idx`` (relabelled ``split`` when given)."""
    ds = info.dataset
    sub: Dataset = ds.with_indices(idx) if isinstance(ds, TensorImageDataset) else Subset(ds, idx.tolist())
    return DatasetInfo(sub, info.num_classes, info.in_chans, info.image_size, info.name, split or info.split,
                       info.mean, info.std)


def _take_subset(info: DatasetInfo, n: int, seed: int) -> DatasetInfo:
    """Return ``info`` restricted to a class-balanced subset of ``n`` examples."""
    return _restrict(info, balanced_subset_indices(_targets(info.dataset), n, info.num_classes, seed))


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a DataLoader worker from the per-worker torch seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(
    ds: Dataset | DatasetInfo,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
) -> DataLoader:
    """Return a DataLoader whose order depends only on ``seed`` (and the epoch, when distributed).

    The loader owns a ``torch.Generator`` seeded with ``seed`` (``loader.generator``); the
    training loop saves and restores its state so a resumed run sees the same batches.
    With ``distributed`` a ``DistributedSampler`` (same seed on every rank) shards the data;
    the training loop calls its ``set_epoch``. ``persistent_workers`` stays off by default
    because persistent workers keep their RNG across epochs, which a resume cannot restore.
    """
    dataset = ds.dataset if isinstance(ds, DatasetInfo) else ds
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = None
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("make_loader(distributed=True) needs torch.distributed initialised; call init_distributed() first")
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )
