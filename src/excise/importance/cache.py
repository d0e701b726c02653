"""Cache of importance scores, keyed by everything the scores depend on.

The importance of the full training set D does not depend on the request, so it is computed once
per model and reused: each later request pays only a pass over D_f. The key covers the weights and
buffers, which parameters require grad, the network's code (every module's type, its configuration and
the source of its ``forward``), the Task (its class, the source of its methods and its attributes), the
data (content, batching and order), the estimator and its options, and the device type. Entries on disk
carry a SHA-256 of their tensors: an entry that fails it is discarded with a warning and recomputed.

What the key cannot see: a forward pass that reads global state or a closure defined outside the module.
Pass ``importance_cache=False`` to :func:`excise.unlearn` for such a model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset
from torch.utils.data.sampler import RandomSampler, SequentialSampler

from .. import distributed
from ..storage import default_cache_dir, state_hash, tensor_digest
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


def loader_fingerprint(loader, order_free: bool = False) -> Optional[str]:
    """What a batch-level estimator sees: data content + batching + order. None when unknown.

    ``order_free``: for a per-sample estimator, which sees only the set of samples: a loader over every sample
    of its dataset (sequential or shuffled without replacement, no sample dropped) is keyed by the content alone,
    so the same data at another batch size or order hits the same entry."""
    if not isinstance(loader, DataLoader):
        return None
    fp = dataset_fingerprint(loader.dataset)
    if fp is None:
        return None
    if order_free and _every_sample_once(loader):
        return f"{fp}|every sample once"
    order = "sequential" if isinstance(loader.sampler, SequentialSampler) else type(loader.sampler).__name__
    return f"{fp}|bs={loader.batch_size}|drop_last={loader.drop_last}|{order}"


def _every_sample_once(loader: DataLoader) -> bool:
    sampler = loader.sampler
    whole = isinstance(sampler, SequentialSampler) or (
        isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == len(loader.dataset))
    dropped = loader.drop_last and loader.batch_size and len(loader.dataset) % loader.batch_size
    return bool(whole and not dropped)


def _source(obj) -> str:
    """The source text of a function or class; its qualified name where the source cannot be read."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _class_code(cls) -> str:
    """The source of every class in ``cls``'s MRO that is not torch's or Python's own."""
    parts = []
    for c in cls.__mro__:
        mod = getattr(c, "__module__", "") or ""
        if c is object or mod.split(".")[0] in ("torch", "builtins"):
            parts.append(f"{mod}.{c.__qualname__}")
        else:
            parts.append(_source(c))
    return "\n".join(parts)


def model_code_fingerprint(model: nn.Module) -> str:
    """The network's code and configuration: each module's name, type and ``extra_repr`` (e.g. a layer's sizes,
    an activation's settings), the source of every non-torch module class, and which parameters require grad."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"{name}|{type(m).__module__}.{type(m).__qualname__}|{m.extra_repr()}".encode())
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        h.update(_class_code(cls).encode())
    h.update(json.dumps([(n, p.requires_grad) for n, p in model.named_parameters()]).encode())
    return h.hexdigest()


def task_fingerprint(task) -> str:
    """The Task's class (source of its code) and its attributes (e.g. a label-smoothing factor)."""
    state = {k: repr(v) for k, v in sorted(vars(task).items())} if hasattr(task, "__dict__") else {}
    return hashlib.sha256(f"{_class_code(type(task))}|{json.dumps(state, sort_keys=True)}".encode()).hexdigest()


def _samples_tag(scores: Scores) -> str:
    return "" if scores.samples is None else f"samples={scores.samples}|"


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
        """The stored scores, or None. A disk entry that cannot be read or fails its checksum is deleted with a
        warning (and so recomputed by :meth:`get_or_compute`)."""
        if self._mem is not None and key in self._mem:
            return self._mem[key]
        p = self._path(key)
        if p is None or not p.exists():
            return None
        from safetensors import SafetensorError, safe_open

        problem = None
        try:
            with safe_open(str(p), "pt") as f:
                f_meta = f.metadata() or {}
                stored = f_meta.get("sha256")
            s = Scores.load(p)
            samples = (f_meta or {}).get("samples")
            s.samples = int(samples) if samples else None
            if stored is None:
                problem = "it has no checksum"
            elif stored != tensor_digest(s, _samples_tag(s)):
                problem = "its checksum does not match its tensors"
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            problem = f"it cannot be read ({e})"
        if problem is not None:
            warnings.warn(f"importance cache entry {p} is corrupt: {problem}; discarded, recomputing", RuntimeWarning,
                          stacklevel=3)
            p.unlink(missing_ok=True)
            return None
        if self._mem is not None:
            self._mem[key] = s
        return s

    def put(self, key: str, scores: Scores, disk: bool = True) -> None:
        """Store ``scores`` in memory and, with ``disk`` and a root, on disk (atomically)."""
        if self._mem is not None:
            self._mem[key] = scores
        p = self._path(key)
        if p is not None and disk:
            from ..types import save_tensors

            meta = {"type": "Scores", "sha256": tensor_digest(scores, _samples_tag(scores))}
            if scores.samples is not None:
                meta["samples"] = str(scores.samples)
            save_tensors(scores, p, metadata=meta)

    def get_or_compute(self, model: nn.Module, loader, estimator: str, compute: Callable[[], Scores],
                       options: Optional[Dict[str, Any]] = None, data_key: Optional[str] = None,
                       task: Any = None) -> Tuple[Scores, str]:
        """Return ``(scores, status)`` with status ``hit``, ``miss`` or ``uncacheable`` (data of unknown content).
        ``task``: the Task the scores are computed with (part of the key)."""
        from ..tasks import model_device

        data_key = data_key or loader_fingerprint(loader, order_free=bool((options or {}).get("order_free")))
        if data_key is None:
            return compute(), "uncacheable"
        opts = dict(options or {}, model_code=model_code_fingerprint(model), device=model_device(model).type,
                    task=task_fingerprint(task) if task is not None else None)
        key = self.key(state_hash(model), data_key, estimator, opts)
        # under torch.distributed rank 0 decides and reads, the others receive its scores: every rank takes the
        # same branch (a miss is a sharded pass that needs them all), and no rank needs the cache folder
        found = self.get(key) if distributed.is_main() else None
        if distributed.active():
            found = distributed.broadcast_object(None if found is None else found.to("cpu"))
        if found is not None:
            self.hits += 1
            device = next(model.parameters()).device
            return found.to(device), "hit"
        self.misses += 1
        scores = compute()
        self.put(key, scores, disk=distributed.is_main())
        distributed.barrier()
        return scores, "miss"


_DEFAULT: Optional[ImportanceCache] = None


def default_cache() -> ImportanceCache:
    """The process-wide cache: memory, plus disk under the cache folder ($EXCISE_CACHE or ~/.cache/excise)."""
    global _DEFAULT

    if _DEFAULT is None or _DEFAULT.root != default_cache_dir():
        _DEFAULT = ImportanceCache(root=default_cache_dir())
    return _DEFAULT
