import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from excise.data import FASHION_MNIST_COARSE, load_cifar, load_dataset, load_digits, load_fashion_mnist


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_fashion_mnist_from_idx_files_in_custom_root(tmp_path):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", [9, 0, 3])
    ds = load_fashion_mnist("train", root=tmp_path, normalize=False)
    assert ds.x.shape == (3, 1, 28, 28)
    assert ds.targets.tolist() == [9, 0, 3]
    assert torch.allclose(ds.x[0, 0], torch.tensor(imgs[0], dtype=torch.float32) / 255)
    assert ds.classes[9] == "Ankle boot"


def test_fashion_mnist_env_root(tmp_path, monkeypatch):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", [1, 2])
    monkeypatch.setenv("EXCISE_FASHION_MNIST_ROOT", str(tmp_path))
    assert len(load_fashion_mnist("train")) == 2


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_real_fashion_mnist_and_coarse_map():
    ds = load_fashion_mnist("train")
    assert ds.x.shape == (60000, 1, 28, 28) and len(load_fashion_mnist("test")) == 10000
    coarse = ds.with_coarse_labels(FASHION_MNIST_COARSE)
    assert coarse.classes == ["top", "bottom", "dress", "footwear", "bag"]
    fine = ds.classes
    for cname, members in FASHION_MNIST_COARSE.items():
        ids = [fine.index(m) for m in members]
        sel = torch.isin(coarse.fine_targets, torch.tensor(ids))
        assert (coarse.targets[sel] == coarse.classes.index(cname)).all()
    assert torch.equal(coarse.fine_targets, ds.targets)
    assert load_dataset("fashion-mnist-coarse").num_classes == 5


def test_coarse_map_must_cover_all_classes():
    ds = load_digits("train")
    with pytest.raises(ValueError, match="unassigned"):
        ds.with_coarse_labels({"low": ["0", "1"]})


def test_digits_split_is_disjoint_and_seeded():
    tr, te = load_digits("train"), load_digits("test")
    assert len(tr) + len(te) == 1797 and tr.input_shape == (1, 8, 8)
    assert torch.equal(load_digits("train").x, tr.x)


def _cifar10_dir(tmp_path, n=4):
    rng = np.random.default_rng(0)
    for i in range(1, 3):
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}, f)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((n, 3072), dtype=np.uint8), b"labels": [1] * n}, f)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return tmp_path


def test_cifar10_reader(tmp_path):
    d = _cifar10_dir(tmp_path)
    tr = load_cifar(d, "train", normalize=False)
    assert tr.x.shape == (8, 3, 32, 32) and tr.targets.tolist() == [0, 1, 2, 3] * 2
    assert tr.classes[3] == "c3"
    with open(d / "data_batch_1", "rb") as f:
        raw = pickle.load(f)[b"data"]
    assert torch.allclose(tr.x[1], torch.tensor(raw[1].reshape(3, 32, 32), dtype=torch.float32) / 255)
    assert load_cifar(d, "test").targets.tolist() == [1] * 4


def test_cifar100_reader_fine_and_coarse(tmp_path):
    for split in ("train", "test"):
        with open(tmp_path / split, "wb") as f:
            pickle.dump({b"data": np.ones((3, 3072), dtype=np.uint8), b"fine_labels": [5, 50, 99],
                         b"coarse_labels": [0, 10, 19]}, f)
    assert load_cifar(tmp_path, "train").targets.tolist() == [5, 50, 99]
    assert load_cifar(tmp_path, "test", label="coarse").targets.tolist() == [0, 10, 19]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_reader_refuses_arbitrary_objects(tmp_path):
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar(tmp_path, "test", num_classes=10)


def test_cifar_needs_a_root():
    with pytest.raises(ValueError, match="never downloads"):
        load_dataset("cifar10")
