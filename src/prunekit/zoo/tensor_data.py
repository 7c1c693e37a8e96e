"""In-memory image data sets with batched tensor augmentation, the IDX reader and subsets.

Everything the small benchmark sets need (digits, MNIST-like, CIFAR-like, generic ``.npz``)
fits in memory as one ``(N, C, H, W)`` tensor, so we keep it there and augment whole
batches with tensor ops: no PIL round trip per image. ``zoo/data.py`` builds these.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["TensorImageDataset", "balanced_subset_indices", "channel_stats", "read_idx"]

# IDX type codes from the MNIST file-format description (big-endian payloads).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) and return its array in native byte order.

    The compression is detected from the gzip magic bytes, not the file name, so a
    decompressed file that kept its ``.gz`` name (or the reverse) still reads.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:  # truncated stream, bad CRC, damaged data
            raise ValueError(f"{path}: truncated or corrupt gzip file") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says {dims} x {dtype.itemsize} bytes but the payload has "
            f"{len(raw) - offset} bytes (truncated or corrupt file)"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def balanced_subset_indices(targets: Sequence[int] | np.ndarray | Tensor, n: int, num_classes: int, seed: int) -> np.ndarray:
    """Return sorted indices of a class-balanced subset with exactly ``n // num_classes`` per class.

    Examples of each class are drawn without replacement by a ``numpy`` generator seeded
    with ``seed``, so the subset is reproducible. Raises ``ValueError`` when ``n`` is smaller
    than the number of classes or a class has too few examples.
    """
    y = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets).astype(np.int64)
    per_class = n // num_classes
    if per_class < 1:
        raise ValueError(f"subset={n} is smaller than the number of classes ({num_classes})")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise ValueError(f"subset={n} needs {per_class} examples of class {c} but there are only {len(idx)}")
        chosen.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(chosen))


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return per-channel (mean, std) of ``(N, C, H, W)`` images scaled to [0, 1] (uint8 / 255).

    Accumulates in float64 over chunks so that large uint8 sets never exist as one float copy.
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        x = _to_unit_float(images[start : start + chunk]).double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _to_unit_float(x: Tensor) -> Tensor:
    """uint8 images become float in [0, 1]; float images are taken to be in [0, 1] already."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


class TensorImageDataset(Dataset):
    """Images held as one ``(N, C, H, W)`` tensor, returned normalised and optionally augmented.

    ``images`` are uint8 (0..255) or float in [0, 1]; storing uint8 keeps the big sets at a
    quarter of the memory. Each item is ``(float tensor (C, S, S), int label)`` where ``S`` is
    ``size`` (bilinear resize on the fly) or the stored size. With ``augment`` the image is
    zero-padded by ``pad`` pixels and randomly cropped back (plus a random horizontal flip
    when ``flip``), before normalisation, like torchvision's ``RandomCrop(padding=pad)``.
    Randomness comes from torch's global generator (per worker under a DataLoader).
    ``__getitems__`` lets the DataLoader fetch and augment a whole batch in a few ops.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        flip: bool = False,
        pad: int = 0,
        size: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError(f"images must be (N, C, H, W) with N == len(targets); got {tuple(images.shape)} and {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.long()
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.flip = flip
        self.pad = pad
        self.size = size
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        """Return the number of images."""
        return int(self.images.shape[0])

    def with_indices(self, indices: np.ndarray | Tensor) -> TensorImageDataset:
        """Return a new data set holding only ``indices`` (same transforms), sharing no storage."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return TensorImageDataset(
            self.images[idx].clone(), self.targets[idx].clone(), mean=self.mean.flatten().tolist(),
            std=self.std.flatten().tolist(), augment=self.augment, flip=self.flip, pad=self.pad,
            size=self.size, classes=self.classes,
        )

    def transform(self, x: Tensor) -> Tensor:
        """Scale, resize, augment (if enabled) and normalise a batch ``(B, C, H, W)``; return float."""
        x = _to_unit_float(x)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            down = self.size < max(x.shape[-2:])
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=down)
        if self.augment:
            x = self._augment(x)
        return (x - self.mean) / self.std

    def _augment(self, x: Tensor) -> Tensor:
        """Random pad-and-crop (and flip) with per-image offsets for a whole batch."""
        b, _, h, w = x.shape
        if self.pad > 0:
            xp = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
            oy = torch.randint(0, 2 * self.pad + 1, (b,)).tolist()
            ox = torch.randint(0, 2 * self.pad + 1, (b,)).tolist()
            # One strided slice copy per image measured several times faster than a single
            # advanced-indexing gather over the batch.
            out = torch.empty_like(x)
            for i, (dy, dx) in enumerate(zip(oy, ox)):
                out[i] = xp[i, :, dy : dy + h, dx : dx + w]
            x = out
        if self.flip:
            do_flip = (torch.rand(b) < 0.5)[:, None, None, None]
            x = torch.where(do_flip, x.flip(-1), x)
        return x

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return ``(image, label)`` for one index (negative indices count from the end)."""
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        x = self.transform(self.images[index : index + 1])[0]
        return x, int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """Return a list of ``(image, label)`` for a batch of indices, transformed together."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        xs = self.transform(self.images[idx])
        return list(zip(xs.unbind(0), self.targets[idx].tolist()))
