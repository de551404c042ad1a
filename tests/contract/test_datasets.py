import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from contract.datasets import (
    DatasetNotFoundError,
    load_dataset,
    read_idx,
)
from contract.preprocessing import resize_images


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_fake_mnist(folder: Path, n_train: int = 100, n_test: int = 20,
                     compress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    train_x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    write_idx(folder / "train-images-idx3-ubyte", train_x, compress)
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(n_train) % 10, compress)
    write_idx(folder / "t10k-images-idx3-ubyte", test_x, compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, compress)
    return train_x, test_x


def test_mnist5k_is_a_fixed_stratified_4000_500_500_split() -> None:
    first, again = load_dataset("mnist5k"), load_dataset("mnist5k")
    assert (len(first.train), len(first.val), len(first.test)) == (4000, 500, 500)
    for split in (first.train, first.val, first.test):
        counts = np.bincount(split.labels, minlength=10)
        assert (counts == len(split) // 10).all()
    assert first.train.images.shape[1:] == (28, 28, 1)
    assert first.train.images.dtype == np.uint8
    np.testing.assert_array_equal(first.test.images, again.test.images)
    flat = {img.tobytes() for img in first.train.images}
    assert not any(img.tobytes() in flat for img in first.test.images)


def test_digits_are_stretched_to_the_full_grey_range() -> None:
    ds = load_dataset("digits")
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert ds.train.images.shape[1:] == (8, 8, 1)
    assert ds.train.images.max() == 255


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files_and_keeps_the_official_test_set(tmp_path: Path,
                                                               compress: bool) -> None:
    train_x, test_x = write_fake_mnist(tmp_path / "mnist", compress=compress)
    ds = load_dataset("mnist", tmp_path)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (90, 10, 20)
    np.testing.assert_array_equal(ds.test.images[..., 0], test_x)
    np.testing.assert_array_equal(ds.test.labels, np.arange(20) % 10)
    assert ds.class_names[0] == "0"


def test_fashion_mnist_uses_its_own_folder_and_class_names(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "fashion-mnist")
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.class_names[9] == "ankle boot"


def test_truncated_idx_file_is_refused_with_sizes(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError,
                       match=r"header says \(4, 28, 28\) = 3136 bytes, file holds 3126"):
        read_idx(path)


def test_cifar10_reads_python_batches_in_hwc_order(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (20, 3 * 32 * 32), dtype=np.uint8)
        batches[name] = data
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(np.arange(20) % 10)}, f)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.color == "RGB" and ds.class_names[3] == "cat"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (90, 10, 20)
    red_plane = batches["test_batch"][0, :1024].reshape(32, 32)
    np.testing.assert_array_equal(ds.test.images[0, :, :, 0], red_plane)


def test_missing_dataset_names_the_files_and_the_folder(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte", np.zeros((1, 28, 28)))
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "mnist") in message
    assert "t10k-images-idx3-ubyte" in message and "train-labels-idx1-ubyte" in message
    assert "train-images-idx3-ubyte," not in message  # present, so not listed


def test_missing_data_dir_and_unknown_dataset_are_explained() -> None:
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*mnist5k"):
        load_dataset("imagenet")


def test_resize_matches_pil_bilinear_and_keeps_uint8() -> None:
    images = load_dataset("digits").test.images[:3]
    out = resize_images(images, "L", 28, 28)
    assert out.shape == (3, 28, 28, 1) and out.dtype == np.uint8
    assert resize_images(out, "L", 28, 28) is out
