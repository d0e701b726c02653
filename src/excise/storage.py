"""Where excise keeps what it computes, and how it names it: the cache folder and content hashes.

Trained models, importance scores and benchmark rows are stored under keys derived from everything that produced
them; these are the hashes those keys are made of. (Atomic writes and safetensors I/O: ``excise.types``.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

CACHE_ENV = "EXCISE_CACHE"


def default_cache_dir() -> Path:
    """``$EXCISE_CACHE``, else the platform's user cache folder for excise (``~/.cache/excise`` on Linux)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get(CACHE_ENV) or user_cache_dir("excise", appauthor=False))


def tensor_digest(tensors: Dict[str, torch.Tensor], extra: str = "") -> str:
    """SHA-256 of named tensors (sorted names, shapes, dtypes, bytes), prefixed by ``extra``."""
    h = hashlib.sha256(extra.encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_hash(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """A 32-hex-digit key for a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_row(key: str, compute) -> Dict[str, Any]:
    """A benchmark row (a JSON-able dict) from the cache folder's ``bench/<key>.json``, or ``compute()``'s,
    stored there atomically; ``from_cache`` says which. Under torch.distributed rank 0 decides and reads, and
    every rank takes the same branch."""
    from . import distributed
    from .types import atomic_write_bytes

    path = default_cache_dir() / "bench" / f"{key}.json"
    row = json.loads(path.read_text()) if distributed.is_main() and path.exists() else None
    row = distributed.broadcast_object(row)
    if row is not None:
        row["from_cache"] = True
        return row
    row = compute()
    atomic_write_bytes(path, json.dumps(row, default=str).encode())
    row["from_cache"] = False
    return row
