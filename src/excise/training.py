"""Seeded SGD training recipes and a content-addressed checkpoint cache.

The original model and the retrain oracle come from the same recipe; the oracle simply sees the
retain set only. A trained model is stored under a key derived from recipe + architecture + data
fingerprint + split hash + seed + role, in safetensors, so later runs load instead of training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import distributed
from .progress import progress as show_progress
from .storage import cache_key, default_cache_dir, tensor_digest
from .tasks import ClassificationTask, Task, model_device
from .types import load_tensors, save_tensors

@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """SGD with momentum (or Adam, ``optimizer="adam"``, for recurrent language models), weight decay and an
    optional cosine schedule."""

    epochs: int = 3
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"  # or "constant"
    optimizer: str = "sgd"  # or "adam"
    clip_grad_norm: Optional[float] = None

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', not {self.optimizer!r}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, default in (("optimizer", "sgd"), ("clip_grad_norm", None)):  # keep older cache keys valid
            if d[k] == default:
                del d[k]
        return d


def seeded_loader(dataset, indices: Optional[Sequence[int]], batch_size: int, shuffle: bool = False,
                  seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader over ``dataset[indices]`` whose shuffling is fixed by ``seed``."""
    ds = dataset if indices is None else Subset(dataset, list(indices))
    g = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last)


def train(model: nn.Module, loader: DataLoader, recipe: TrainRecipe, task: Optional[Task] = None,
          seed: int = 0, progress: bool = True, desc: str = "train",
          after_epoch: Optional[Callable[[int], bool]] = None) -> nn.Module:
    """Train ``model`` in place with ``recipe`` and return it. Deterministic for a given seed on CPU.
    ``after_epoch(epoch)`` (1-based; the model in eval mode meanwhile) may measure it; returning True stops."""
    task = task or ClassificationTask()
    torch.manual_seed(seed)
    device = model_device(model)
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                              weight_decay=recipe.weight_decay)
    steps = recipe.epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if recipe.schedule == "cosine" else None
    model.train()
    bar = show_progress(range(recipe.epochs), progress, desc, unit="epoch")
    for _ in bar:
        total, n = 0.0, 0
        for batch, weight in distributed.split(loader, desc):  # this rank's part of each batch
            opt.zero_grad(set_to_none=True)
            if weight:
                batch = task.to(batch, device)
                loss = distributed.weighted(task.loss(model, batch), weight)
                loss.backward()
                total += float(loss.detach()) / weight * task.batch_size(batch)
                n += task.batch_size(batch)
            distributed.average_grads(model.parameters())
            if recipe.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / max(n, 1):.3f}")
        if after_epoch is not None:
            model.eval()
            stop = after_epoch(_ + 1)
            model.train()
            if stop:
                break
    model.eval()
    return model


def training_environment(model: nn.Module) -> Dict[str, Any]:
    """What, beside the data, seed and recipe, decides a trained model's bits: on a CPU the thread count
    changes the order of floating-point reductions, so the same recipe trained with 1 and with 2 threads gives
    models that differ in the last bits (and, after a full run, in a few predictions). Recorded with every
    cached model so that two that should match but do not can be told apart."""
    device = model_device(model)
    return {"torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


class CheckpointCache:
    """Trained models on disk, addressed by the hash of what produced them.

    One safetensors file per model holds the weights, their metadata (what trained them, how long it took) and
    a SHA-256 of the tensors, written atomically: the pair cannot be half-written, and a file that fails its
    checksum is discarded with a warning and the model trained again."""

    def __init__(self, root: Optional[str | os.PathLike] = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / "models" / f"{key}.safetensors"

    def load_into(self, model: nn.Module, key: str) -> Optional[Dict[str, Any]]:
        """Load a cached state into ``model``; returns the stored metadata or None on a miss (a missing,
        unreadable or corrupt entry: the latter two are deleted with a warning)."""
        import warnings

        from safetensors import SafetensorError, safe_open

        p = self.path(key)
        if not p.exists():
            return None
        problem = None
        try:
            with safe_open(str(p), "pt") as f:
                header = f.metadata() or {}
            state = load_tensors(p)
            legacy = p.with_suffix(".json")
            if "excise_meta" not in header and legacy.exists():  # an older excise's pair: upgrade it in place
                meta = json.loads(legacy.read_text())
                device = model_device(model)
                model.load_state_dict({k: v.to(device) for k, v in state.items()})
                self.store(model, key, meta)
                legacy.unlink()
                return meta
            if "excise_meta" not in header or "sha256" not in header:
                problem = "its metadata is missing (an older excise's file without its .json)"
            elif header["sha256"] != tensor_digest(state):
                problem = "its checksum does not match its tensors"
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # json errors are ValueErrors
            problem = f"it cannot be read ({e})"
        if problem is not None:
            warnings.warn(f"checkpoint cache entry {p} discarded: {problem}; training again", RuntimeWarning,
                          stacklevel=3)
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
            return None
        device = model_device(model)
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
        return json.loads(header["excise_meta"])

    def store(self, model: nn.Module, key: str, meta: Dict[str, Any]) -> None:
        """Weights, metadata and checksum in one file, written atomically."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_tensors(state, self.path(key), metadata={"excise_meta": json.dumps(meta, default=str),
                                                      "sha256": tensor_digest(state)})

    def get_or_train(self, key_parts: Dict[str, Any], build: Callable[[], nn.Module],
                     fit: Callable[[nn.Module], nn.Module]) -> tuple:
        """Return ``(model, meta, hit)``: a cached model for these key parts, or a freshly trained one."""
        key = cache_key(**key_parts)
        model = build()
        meta = self.load_into(model, key) if distributed.is_main() else None
        if distributed.active():  # rank 0 decides and reads; the others receive its weights (or all train)
            meta = distributed.broadcast_object(meta)
            if meta is not None:
                distributed.broadcast_module(model)
        if meta is not None:
            self.hits += 1
            model.eval()
            return model, meta, True
        self.misses += 1
        t0 = time.perf_counter()
        fit(model)
        meta = {"key_parts": key_parts, "train_seconds": time.perf_counter() - t0, **training_environment(model)}
        if distributed.active():
            meta["world_size"] = distributed.world()
        with distributed.main_writes() as write:
            if write:
                self.store(model, key, meta)
        return model, meta, False


def save_state(model: nn.Module, path: str | os.PathLike) -> None:
    """Save parameters and buffers with safetensors (atomic)."""
    save_tensors(model.state_dict(), path)


def read_state(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a safetensors file or a plain state dict (``torch.load(weights_only=True)``,
    optionally under a ``"state_dict"`` key). Anything else (missing, a folder, empty, truncated, random bytes,
    a file that needs arbitrary unpickling, a dict of non-tensors) raises a ValueError (FileNotFoundError for a
    missing file) that says which."""
    import pickle

    from safetensors import SafetensorError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty")
    if path.suffix == ".safetensors":
        try:
            state = load_tensors(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file (truncated or corrupt?): {e}") \
                from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"checkpoint {path} was refused: it is not a state dict of tensors that loads with "
                             f"weights_only=True ({str(e).splitlines()[0]})") from None
        except (RuntimeError, EOFError, OSError, IndexError, KeyError, ValueError, struct.error) as e:
            # a corrupt pickle stream fails inside the unpickler in any of these ways (random bytes: 1 in 12)
            raise ValueError(f"checkpoint {path} is not a readable PyTorch file (truncated or corrupt?): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def load_state(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a safetensors file or a plain state dict (``torch.load(weights_only=True)``) into ``model``
    (:func:`read_state` says what is refused). A state that does not fit the model raises a ValueError."""
    state = read_state(path)
    device = model_device(model)
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[0]}"
                         f"{' …' if len(str(e).splitlines()) > 1 else ''}") from None
    return model
