"""Cache of importance scores, keyed by (model weights hash, data fingerprint, estimator).

The importance of the full training set D does not depend on the request, so it is computed once
per model and reused: each later request pays only a pass over D_f. A change to the weights changes
the key, so stale scores are never served.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset
from torch.utils.data.sampler import SequentialSampler

from ..types import Scores


def dataset_fingerprint(ds) -> Optional[str]:
    """Content fingerprint of an excise ArrayDataset, a TensorDataset, or a Subset of either; else None."""
    if hasattr(ds, "fingerprint") and callable(ds.fingerprint):
        return ds.fingerprint()
    if isinstance(ds, Subset):
        base = dataset_fingerprint(ds.dataset)
        if base is None:
            return None
        idx = ",".join(map(str, list(ds.indices)))
        return hashlib.sha256(f"{base}|{idx}".encode()).hexdigest()
    if isinstance(ds, ConcatDataset):
        parts = [dataset_fingerprint(d) for d in ds.datasets]
        return None if None in parts else hashlib.sha256("+".join(parts).encode()).hexdigest()
    if isinstance(ds, TensorDataset):
        h = hashlib.sha256()
        for t in ds.tensors:
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    return None


def loader_fingerprint(loader) -> Optional[str]:
    """What a batch-level estimator sees: data content + batching + order. None when unknown."""
    if not isinstance(loader, DataLoader):
        return None
    fp = dataset_fingerprint(loader.dataset)
    if fp is None:
        return None
    order = "sequential" if isinstance(loader.sampler, SequentialSampler) else type(loader.sampler).__name__
    return f"{fp}|bs={loader.batch_size}|drop_last={loader.drop_last}|{order}"


class ImportanceCache:
    """In-memory and (optionally) on-disk store of Scores."""

    def __init__(self, root: Optional[str | os.PathLike] = None, memory: bool = True):
        self.root = Path(root) if root is not None else None
        self._mem: Dict[str, Scores] = {} if memory else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_hash: str, data_key: str, estimator: str, options: Dict[str, Any]) -> str:
        body = json.dumps({"model": model_hash, "data": data_key, "estimator": estimator, "options": options},
                          sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:32]

    def _path(self, key: str) -> Optional[Path]:
        return None if self.root is None else self.root / "importance" / f"{key}.safetensors"

    def get(self, key: str) -> Optional[Scores]:
        if self._mem is not None and key in self._mem:
            return self._mem[key]
        p = self._path(key)
        if p is not None and p.exists():
            s = Scores.load(p)
            if self._mem is not None:
                self._mem[key] = s
            return s
        return None

    def put(self, key: str, scores: Scores) -> None:
        if self._mem is not None:
            self._mem[key] = scores
        p = self._path(key)
        if p is not None:
            scores.save(p)

    def get_or_compute(self, model: nn.Module, loader, estimator: str, compute: Callable[[], Scores],
                       options: Optional[Dict[str, Any]] = None, data_key: Optional[str] = None) -> Tuple[Scores, str]:
        """Return ``(scores, status)`` with status ``hit``, ``miss`` or ``uncacheable`` (data of unknown content)."""
        from ..training import state_hash

        data_key = data_key or loader_fingerprint(loader)
        if data_key is None:
            return compute(), "uncacheable"
        key = self.key(state_hash(model), data_key, estimator, options or {})
        found = self.get(key)
        if found is not None:
            self.hits += 1
            device = next(model.parameters()).device
            return found.to(device), "hit"
        self.misses += 1
        scores = compute()
        self.put(key, scores)
        return scores, "miss"


_DEFAULT: Optional[ImportanceCache] = None


def default_cache() -> ImportanceCache:
    """The process-wide cache: memory, plus disk under the cache folder ($EXCISE_CACHE or ~/.cache/excise)."""
    global _DEFAULT
    from ..training import default_cache_dir

    if _DEFAULT is None or _DEFAULT.root != default_cache_dir():
        _DEFAULT = ImportanceCache(root=default_cache_dir())
    return _DEFAULT
