"""Tests for prunekit.zoo.data: specs, splits, subsets, IDX/npz readers, augmentation, loaders."""

from __future__ import annotations

import gzip
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.zoo.data import DATASET_NAMES, load_dataset, make_loader, read_idx


def _unnormalise(info, x: torch.Tensor) -> np.ndarray:
    """Undo the data set's normalisation: back to [0, 1] pixel units."""
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return (x * std + mean).numpy()


def _stack(info) -> tuple[np.ndarray, np.ndarray]:
    """All items of a data set as arrays (images unnormalised)."""
    xs, ys = zip(*(info.dataset[i] for i in range(len(info.dataset))))
    return np.stack([_unnormalise(info, x) for x in xs]), np.array(ys)


# --- digits -------------------------------------------------------------------------------


def test_digits_shapes_classes_and_split_sizes() -> None:
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    assert (train.num_classes, train.in_chans, train.image_size, train.name) == (10, 1, 16, "digits")
    # 1,797 images, 20% test: ceil(359.4) = 360 test, 1,437 train.
    assert (len(train.dataset), len(test.dataset)) == (1437, 360)
    x, y = train.dataset[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    # Stratified: every class has 17..19 % of its examples in test (class sizes are 174..183).
    counts = Counter(int(test.dataset[i][1]) for i in range(len(test.dataset)))
    assert sorted(counts) == list(range(10)) and all(35 <= c <= 37 for c in counts.values())
    # Normalised with the train split's own statistics: mean ~0, std ~1 over the train set.
    plain = load_dataset("digits", augment=False)
    xs = torch.stack([plain.dataset[i][0] for i in range(len(plain.dataset))])
    assert abs(xs.mean().item()) < 1e-3 and abs(xs.std().item() - 1) < 1e-2


def test_digits_split_is_a_partition_of_sklearn_digits_and_deterministic() -> None:
    from sklearn.datasets import load_digits

    ref = load_digits()
    tr = load_dataset("digits", image_size=8, augment=False)
    te = load_dataset("digits", split="test", image_size=8, augment=False)
    xtr, ytr = _stack(tr)
    xte, yte = _stack(te)
    got = sorted(
        (int(y), tuple(np.rint(x.reshape(-1) * 16).astype(int))) for x, y in zip(np.concatenate([xtr, xte]), np.concatenate([ytr, yte]))
    )
    want = sorted((int(y), tuple(im.reshape(-1).astype(int))) for im, y in zip(ref.images, ref.target))
    assert got == want  # every image exactly once, with its label
    again = load_dataset("digits", split="test", image_size=8, augment=False)
    assert np.array_equal(_stack(again)[0], xte) and np.array_equal(_stack(again)[1], yte)


def test_balanced_subset_counts_and_seed() -> None:
    a = load_dataset("digits", subset=105, seed=1, augment=False)
    b = load_dataset("digits", subset=105, seed=1, augment=False)
    c = load_dataset("digits", subset=105, seed=2, augment=False)
    ya, yc = _stack(a)[1], _stack(c)[1]
    assert len(a.dataset) == 100  # 105 // 10 = 10 per class
    assert Counter(ya.tolist()) == {k: 10 for k in range(10)}
    assert Counter(yc.tolist()) == {k: 10 for k in range(10)}
    assert np.array_equal(_stack(a)[0], _stack(b)[0])
    assert not np.array_equal(_stack(a)[0], _stack(c)[0])
    with pytest.raises(ValueError, match="only"):
        load_dataset("digits", split="test", subset=1000)
    with pytest.raises(ValueError, match="smaller than"):
        load_dataset("digits", subset=5)


# --- npz ----------------------------------------------------------------------------------


def _write_npz(path: Path, layout: str, dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("test", 6)):
        x = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
        arrays[f"x_{split}_nhwc"] = x
        if dtype == "float":
            x = x.astype(np.float32) / 255
        arrays[f"x_{split}"] = x.transpose(0, 3, 1, 2) if layout == "nchw" else x
        arrays[f"y_{split}"] = np.arange(n) % 4
    np.savez(path, **{k: v for k, v in arrays.items() if not k.endswith("_nhwc")})
    return arrays


@pytest.mark.parametrize("layout,dtype", [("nhwc", "uint8"), ("nchw", "float")])
def test_npz_loader_reads_the_arrays_written(tmp_path: Path, layout: str, dtype: str) -> None:
    arrays = _write_npz(tmp_path / "d.npz", layout, dtype)
    for split in ("train", "test"):
        info = load_dataset(f"npz:{tmp_path / 'd.npz'}", split=split, augment=False)
        assert (info.num_classes, info.in_chans, info.image_size) == (4, 3, 8)
        x, y = _stack(info)
        want = arrays[f"x_{split}_nhwc"].transpose(0, 3, 1, 2).astype(np.float64) / 255
        np.testing.assert_allclose(x, want, atol=1e-5)
        assert y.tolist() == arrays[f"y_{split}"].tolist()
    # Statistics are measured on x_train (here by numpy, independently).
    ref = arrays["x_train_nhwc"].astype(np.float64) / 255
    np.testing.assert_allclose(info.mean, ref.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(info.std, ref.std(axis=(0, 1, 2)), atol=1e-5)


def test_cifar10_partial_npz_real_file() -> None:
    path = os.environ.get("PRUNEKIT_CIFAR10_NPZ")
    if not path or not Path(path).is_file():
        pytest.skip("set PRUNEKIT_CIFAR10_NPZ to shared/data/cifar10-partial.npz to test the real CIFAR-10 file")
    tr = load_dataset(f"cifar10:{path}", augment=False)
    te = load_dataset(f"cifar10:{path}", split="test")
    assert (len(tr.dataset), len(te.dataset), tr.num_classes, tr.in_chans, tr.image_size) == (5169, 1017, 10, 3, 32)
    # Published facts about data_batch_1 (shared/data/README.md): its first ten labels, and
    # row 0 of the batch begins 59, 43, 50 (red channel of the first three pixels).
    assert [tr.dataset[i][1] for i in range(10)] == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    first = _unnormalise(tr, tr.dataset[0][0])
    assert np.rint(first[0, 0, :3] * 255).astype(int).tolist() == [59, 43, 50]
    sub = load_dataset(f"cifar10:{path}", subset=100, augment=False)
    assert Counter(int(sub.dataset[i][1]) for i in range(len(sub.dataset))) == {k: 10 for k in range(10)}


# --- IDX (MNIST-like) ------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path: Path, compress: bool, dtype: type) -> None:
    arr = (np.arange(5 * 4 * 3).reshape(5, 4, 3) * 7 % 251).astype(dtype)
    data = _idx_bytes(arr)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    path.write_bytes(gzip.compress(data) if compress else data)
    got = read_idx(path)
    assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)


def test_read_idx_rejects_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(_idx_bytes(np.zeros((4, 3, 3), np.uint8))[:-2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def _write_mnist_dir(d: Path, compress: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", 20), ("t10k", 10)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
            data = _idx_bytes(arr)
            (d / (stem + (".gz" if compress else ""))).write_bytes(gzip.compress(data) if compress else data)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_like_loader_from_tiny_idx_files(tmp_path: Path, compress: bool) -> None:
    written = _write_mnist_dir(tmp_path / "m", compress)
    for name in ("mnist", "fashion-mnist"):
        for split, prefix in (("train", "train"), ("test", "t10k")):
            info = load_dataset(f"{name}:{tmp_path / 'm'}", split=split, augment=False)
            assert (info.num_classes, info.in_chans, info.image_size) == (10, 1, 28)
            x, y = _stack(info)
            np.testing.assert_allclose(x[:, 0] * 255, written[prefix][0], atol=1e-3)
            assert y.tolist() == written[prefix][1].tolist()


def test_fashion_mnist_real_files() -> None:
    path = os.environ.get("PRUNEKIT_FASHION_MNIST")
    if not path or not Path(path).is_dir():
        pytest.skip("set PRUNEKIT_FASHION_MNIST to the folder of the Fashion-MNIST IDX files "
                    "(apt-get install dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)")
    tr = load_dataset(f"fashion-mnist:{path}", augment=False)
    te = load_dataset(f"fashion-mnist:{path}", split="test")
    assert (len(tr.dataset), len(te.dataset), tr.image_size, tr.in_chans) == (60000, 10000, 28, 1)
    # Fashion-MNIST is exactly balanced: 6,000 train and 1,000 test images per class.
    assert Counter(tr.dataset.targets.tolist()) == {k: 6000 for k in range(10)}
    assert Counter(te.dataset.targets.tolist()) == {k: 1000 for k in range(10)}
    assert tr.dataset.images.dtype == torch.uint8 and int(tr.dataset.images.max()) == 255


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder"])
def test_missing_paths_raise_file_not_found_naming_the_path(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_dataset(f"{name}:{missing}")


def test_missing_npz_file_and_fashion_hint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset(f"fashion-mnist:{tmp_path}")


def test_cifar_folder_with_corrupt_batches_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    for spec in (f"cifar10:{tmp_path}", f"cifar10:{folder}"):  # the root or the batches folder itself
        with pytest.raises(FileNotFoundError, match="incomplete or corrupt"):
            load_dataset(spec)


def test_unknown_prefix_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        load_dataset("svhn:/x")
    for name in DATASET_NAMES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="dev")


# --- augmentation and loaders -------------------------------------------------------------


def _explained_by_crop(aug: np.ndarray, orig: np.ndarray, pad: int, allow_flip: bool) -> bool:
    """True if ``aug`` equals some zero-padded crop (optionally flipped) of ``orig`` (C,H,W)."""
    c, h, w = orig.shape
    padded = np.pad(orig, ((0, 0), (pad, pad), (pad, pad)))
    candidates = [padded, padded[:, :, ::-1]] if allow_flip else [padded]
    for img in candidates:
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if np.allclose(img[:, dy : dy + h, dx : dx + w], aug, atol=1e-5):
                    return True
    return False


def test_augmentation_keeps_shape_changes_pixels_and_is_crop_flip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(1, 256, size=(4, 32, 32, 3), dtype=np.uint8)  # no zeros: padding is visible
    np.savez(tmp_path / "c.npz", x_train=x, y_train=np.arange(4), x_test=x, y_test=np.arange(4))
    aug = load_dataset(f"cifar10:{tmp_path / 'c.npz'}")  # train split: augmentation on by default
    plain = load_dataset(f"cifar10:{tmp_path / 'c.npz'}", augment=False)
    torch.manual_seed(0)
    changed = 0
    keys = [0, 1, 2, 3] * 4 + [1]
    items = aug.dataset.__getitems__(keys[:-1]) + [aug.dataset[keys[-1]]]  # batched and single paths
    for k, (xa, ya) in zip(keys, items):
        assert ya == k
        xp = plain.dataset[k][0]
        assert xa.shape == xp.shape == (3, 32, 32)
        changed += not torch.allclose(xa, xp)
        a, p = _unnormalise(aug, xa), _unnormalise(plain, xp)
        assert _explained_by_crop(a, p, pad=4, allow_flip=True)
    assert changed >= 10  # P(identity crop, no flip) = 1/162 per draw


def test_grey_augmentation_never_flips() -> None:
    aug = load_dataset("digits", augment=True, subset=20)
    plain = load_dataset("digits", augment=False, subset=20)
    torch.manual_seed(1)
    for i in range(len(aug.dataset)):
        a, p = _unnormalise(aug, aug.dataset[i][0]), _unnormalise(plain, plain.dataset[i][0])
        assert a.shape == (1, 16, 16)
        assert _explained_by_crop(a, p, pad=2, allow_flip=False)


def test_make_loader_order_depends_only_on_seed() -> None:
    info = load_dataset("digits", augment=False, subset=50)

    def labels(seed: int) -> list[int]:
        return [int(v) for _, y in make_loader(info, batch_size=8, shuffle=True, seed=seed) for v in y]

    assert labels(3) == labels(3)
    assert labels(3) != labels(4)
    assert sorted(labels(3)) == sorted(info.dataset.targets.tolist())
    xb, yb = next(iter(make_loader(info, batch_size=8, shuffle=False, seed=0)))
    assert xb.shape == (8, 1, 16, 16) and yb.dtype == torch.int64


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    info = load_dataset(f"imagefolder:{tmp_path}", split="val", image_size=16)
    assert (info.num_classes, info.in_chans, info.image_size, len(info.dataset)) == (2, 3, 16, 4)
    assert info.dataset[0][0].shape == (3, 16, 16)


def test_val_split_is_carved_from_train_and_disjoint() -> None:
    full = load_dataset("digits", split="train", augment=False)
    train = load_dataset("digits", split="train", augment=False, val_size=200, seed=5)
    val = load_dataset("digits", split="val", val_size=200, seed=9)
    assert len(val) == 200 and len(train) == len(full) - 200
    assert not val.dataset.augment
    # Every held-out image is a training image, none is left in train, and the user's seed
    # does not move the held-out set.
    key = lambda ds: {(bytes(ds.images[i].numpy().tobytes()), int(ds.targets[i])) for i in range(len(ds))}  # noqa: E731
    k_full, k_train, k_val = key(full.dataset), key(train.dataset), key(val.dataset)
    assert k_val <= k_full and not (k_val & k_train)
    assert k_val == key(load_dataset("digits", split="val", val_size=200, seed=0).dataset)
    assert np.bincount(val.dataset.targets.numpy(), minlength=10).tolist() == [20] * 10


def test_val_without_size_is_an_error_not_the_test_split() -> None:
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("digits", split="valid")
