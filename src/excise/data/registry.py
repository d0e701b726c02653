"""The dataset registry: datasets by name, as models are (``excise.models.register_model``).

A dataset is a function ``(split, root) -> ArrayDataset`` for ``split`` in ``"train"`` / ``"test"``, registered with
:func:`register_dataset`, optionally with coarse labels as metadata (a map of coarse class → fine class names):
``load_dataset("<name>-coarse")`` is then the dataset with those labels, for sub-class forgetting. The registry
imports no dataset: ``excise.data`` registers the built-in ones (``excise/data/sources.py``).

A user's own dataset needs no registration: the name ``package.module:function`` imports ``function`` and calls
it with ``(split, root)``. It returns an :class:`ArrayDataset`, a ``(inputs, labels)`` pair of tensors, or any
map-style dataset of ``(input, label)`` pairs (stacked into memory). So ``excise unlearn --data mypkg.data:load``
and a protocol's ``dataset = "mypkg.data:load"`` both work.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .arrays import ArrayDataset

COARSE_SUFFIX = "-coarse"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[..., ArrayDataset]
    summary: str = ""
    coarse: Optional[Dict[str, List[str]]] = None  # coarse class → fine class names (sub-class forgetting)
    needs_root: bool = False  # read from a user-supplied folder only (never downloaded)


_DATASETS: Dict[str, DatasetSpec] = {}


def register_dataset(name: str, load: Optional[Callable] = None, *, summary: str = "",
                     coarse: Optional[Dict[str, Sequence[str]]] = None, needs_root: bool = False):
    """Register ``load(split, root) -> ArrayDataset`` as ``name``; usable as a decorator."""
    def deco(fn):
        if name in _DATASETS and _DATASETS[name].load is not fn:
            raise ValueError(f"dataset {name!r} is already registered")
        if ":" in name or name.endswith(COARSE_SUFFIX):
            raise ValueError(f"dataset name {name!r} may not contain ':' or end in {COARSE_SUFFIX!r}")
        _DATASETS[name] = DatasetSpec(name, fn, summary, None if coarse is None else
                                      {k: list(v) for k, v in coarse.items()}, needs_root)
        return fn
    return deco(load) if load is not None else deco


def dataset_names() -> List[str]:
    """Registered names, and ``<name>-coarse`` for those with coarse labels."""
    out = []
    for n, s in sorted(_DATASETS.items()):
        out.append(n)
        if s.coarse:
            out.append(n + COARSE_SUFFIX)
    return out


def get_dataset(name: str) -> DatasetSpec:
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(dataset_names())}, or "
                         "'package.module:function' for your own")
    return _DATASETS[name]


def has_coarse(name: str) -> bool:
    """Whether ``name`` is a registered dataset with coarse labels (so ``name-coarse`` exists)."""
    return name in _DATASETS and bool(_DATASETS[name].coarse)


def load_dataset(name: str, split: str = "train", root: Optional[str] = None):
    """The dataset ``name`` (registered, ``<registered>-coarse``, or ``package.module:function``), one split."""
    if ":" in name:
        return _user_dataset(name, split, root)
    base = name[:-len(COARSE_SUFFIX)] if name.endswith(COARSE_SUFFIX) and name not in _DATASETS else name
    spec = get_dataset(base)
    if spec.needs_root and root is None:
        raise ValueError(f"{base} needs root=<its folder> (--data-root); excise never downloads")
    ds = spec.load(split, root)
    if base != name:
        if not spec.coarse:
            raise ValueError(f"{base} declares no coarse labels; {name!r} does not exist")
        ds = ds.with_coarse_labels(spec.coarse)
    return ds


def _user_dataset(name: str, split: str, root: Optional[str]) -> ArrayDataset:
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"dataset {name!r}: cannot import {attr} from {module} ({e})") from None
    got = fn(split, root)
    if isinstance(got, ArrayDataset):
        return got
    if isinstance(got, tuple) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got):
        x, y = got
    else:
        try:
            pairs = [got[i] for i in range(len(got))]
        except TypeError:
            raise TypeError(f"dataset {name!r} returned {type(got).__name__}: return an ArrayDataset, a pair of "
                            "tensors (inputs, labels) or a map-style dataset of (input, label) pairs") from None
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    classes = getattr(got, "classes", None) or [str(c) for c in range(int(y.max()) + 1 if len(y) else 0)]
    return ArrayDataset(x.float() if not x.is_floating_point() else x, y.long(), classes, f"{name}-{split}")
