"""Offline data sources. Nothing here downloads: each reader takes files that are already on disk.

Every source returns an :class:`ArrayDataset`: inputs and labels as tensors, class names, and a
content fingerprint used by the caches and split files.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .arrays import ArrayDataset
from .registry import register_dataset

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Coarse labels for sub-class forgetting: forget one fine class while the model predicts coarse ones.
FASHION_MNIST_COARSE = {
    "top": ["T-shirt/top", "Pullover", "Coat", "Shirt"],
    "bottom": ["Trouser"],
    "dress": ["Dress"],
    "footwear": ["Sandal", "Sneaker", "Ankle boot"],
    "bag": ["Bag"],
}
FASHION_MNIST_ENV = "EXCISE_FASHION_MNIST_ROOT"
FASHION_MNIST_DEFAULT_ROOTS = ["/usr/share/datasets/fashion-mnist"]
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        p = root / name
        if p.exists():
            return p
    return None


def fashion_mnist_root(root: Optional[str | os.PathLike] = None) -> Path:
    """Where the Fashion-MNIST idx files are: ``root``, else $EXCISE_FASHION_MNIST_ROOT, else the Debian path."""
    candidates: List[Path] = []
    if root is not None:
        candidates.append(Path(root))
    elif os.environ.get(FASHION_MNIST_ENV):
        candidates.append(Path(os.environ[FASHION_MNIST_ENV]))
    else:
        candidates.extend(Path(p) for p in FASHION_MNIST_DEFAULT_ROOTS)
    for c in candidates:
        if _find_idx(c, "train-images-idx3-ubyte") is not None:
            return c
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found in {where}. Install them with "
        f"`apt-get install -y dataset-fashion-mnist` (Debian package), or point ${FASHION_MNIST_ENV} "
        f"(or root=...) at a folder holding train-images-idx3-ubyte[.gz] and the other three files."
    )


def load_fashion_mnist(split: str = "train", root: Optional[str | os.PathLike] = None,
                       normalize: bool = True) -> ArrayDataset:
    """Fashion-MNIST from the idx files of the Debian package ``dataset-fashion-mnist`` (never downloads)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    base = fashion_mnist_root(root)
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_idx(base, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(base, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(f"{base} lacks the {split} idx files of Fashion-MNIST")
    images = torch.from_numpy(_read_idx(img_path).copy()).float().div_(255.0).unsqueeze(1)
    if normalize:
        images = images.sub_(_FMNIST_MEAN).div_(_FMNIST_STD)
    labels = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
    return ArrayDataset(images, labels, FASHION_MNIST_CLASSES, f"fashion-mnist-{split}")


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """scikit-learn's 8×8 digits (1,797 images, ships with scikit-learn), split by a seeded permutation."""
    from sklearn.datasets import load_digits as _load

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    classes = [str(i) for i in range(10)]
    if split == "all":
        return ArrayDataset(x, y, classes, "digits-all")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    idx = idx.sort().values
    return ArrayDataset(x[idx], y[idx], classes, f"digits-{split}-{seed}-{test_fraction}")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python format (dicts of bytes, lists and numpy arrays) and nothing else."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _read_cifar_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        d = _ArraysOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR python-format batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def load_cifar(root: str | os.PathLike, split: str = "train", num_classes: Optional[int] = None,
               label: str = "fine", normalize: bool = True) -> ArrayDataset:
    """A user-supplied CIFAR-10 or CIFAR-100 directory in the standard python (pickle) format.

    CIFAR-10: ``data_batch_1..5``, ``test_batch`` and ``batches.meta``. CIFAR-100: ``train``, ``test`` and
    ``meta`` (``label='fine'`` or ``'coarse'``). Only plain arrays are unpickled.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if num_classes is None:
        num_classes = 100 if (root / "train").exists() and not (root / "data_batch_1").exists() else 10
    if num_classes == 10:
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        key, meta_file, meta_key = "labels", root / "batches.meta", "label_names"
    elif num_classes == 100:
        files = [root / split]
        key = f"{label}_labels"
        meta_file, meta_key = root / "meta", f"{label}_label_names"
    else:
        raise ValueError(f"num_classes must be 10 or 100, not {num_classes}")
    files = [f for f in files if f.exists()]
    if not files:
        raise FileNotFoundError(f"no CIFAR-{num_classes} {split} batch files in {root}")
    xs, ys = [], []
    for f in files:
        d = _read_cifar_batch(f)
        if "data" not in d or key not in d:
            raise ValueError(f"{f} lacks 'data' or '{key}'")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    if normalize:
        x = (x - _CIFAR_MEAN) / _CIFAR_STD
    y = torch.from_numpy(np.concatenate(ys))
    if meta_file.exists():
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _read_cifar_batch(meta_file)[meta_key]]
    else:
        names = [str(i) for i in range(int(y.max()) + 1 if len(y) else num_classes)]
    return ArrayDataset(x, y, names, f"cifar{num_classes}-{label}-{split}")


# ---- the built-in datasets ----

register_dataset("fashion-mnist", lambda split, root=None: load_fashion_mnist(split, root), coarse=FASHION_MNIST_COARSE,
                 summary="Fashion-MNIST, 28×28 grey (the Debian package dataset-fashion-mnist, or $EXCISE_FASHION_MNIST_ROOT)")
register_dataset("digits", lambda split, root=None: load_digits(split),
                 summary="scikit-learn's 8×8 digits (ships with scikit-learn), a seeded 80/20 split")
register_dataset("cifar10", lambda split, root=None: load_cifar(root, split, num_classes=10), needs_root=True,
                 summary="CIFAR-10 from a user-supplied folder in the python format")
register_dataset("cifar100", lambda split, root=None: load_cifar(root, split, num_classes=100), needs_root=True,
                 summary="CIFAR-100 (fine labels) from a user-supplied folder in the python format")
