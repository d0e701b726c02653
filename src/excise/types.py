"""Core data types: per-parameter maps (Scores, Mask), the request and the result.

Scores and Mask are plain ``dict[str, Tensor]`` subclasses keyed by the names that
``model.named_parameters()`` yields, so they work with any ``nn.Module``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename). The file gets the
    permissions a plain ``open(path, "w")`` would give it (0666 less the umask), not the temporary file's 0600.
    Under torch.distributed only rank 0 writes (every file excise writes goes through here): the other ranks
    computed the same bytes and return without touching the disk."""
    from . import distributed

    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resolve_device(device: Any = None) -> torch.device:
    """A torch.device from None (CPU), ``"auto"`` (CUDA when available, else MPS, else CPU), a name or a device.
    Asking for CUDA on a machine without it is an error, not a silent fall-back."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this PyTorch build sees no CUDA GPU; use 'cpu' or 'auto'")
    return dev


def save_tensors(tensors: Dict[str, torch.Tensor], path: str | os.PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Save a name → tensor map with safetensors, atomically."""
    from safetensors.torch import save

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Load a safetensors file (never unpickles)."""
    from safetensors.torch import load_file

    return load_file(str(path))


class _ParamMap(dict):
    """A name → tensor map over a model's parameters. ``samples``: for scores that are a mean over samples,
    how many (None when unknown or not a mean)."""

    samples: Optional[int] = None

    def save(self, path: str | os.PathLike) -> None:
        save_tensors(self, path, metadata={"type": type(self).__name__})

    @classmethod
    def load(cls, path: str | os.PathLike):
        return cls(load_tensors(path))

    def to(self, device) -> "_ParamMap":
        moved = type(self)({k: v.to(device) for k, v in self.items()})
        moved.samples = self.samples
        return moved

    def numel(self) -> int:
        return sum(v.numel() for v in self.values())


class Scores(_ParamMap):
    """Per-parameter importance scores: same names and shapes as the parameters they score."""

    def flat(self) -> torch.Tensor:
        return torch.cat([v.reshape(-1).float() for v in self.values()]) if self else torch.zeros(0)


class Mask(_ParamMap):
    """Per-parameter boolean selection. A name absent from the mask is not selected."""

    def count(self) -> int:
        return int(sum(int(v.sum()) for v in self.values()))

    def fraction(self, model: Optional[nn.Module] = None) -> float:
        """Selected entries over all entries in the mask (or over all parameters of ``model``)."""
        total = sum(p.numel() for p in model.parameters()) if model is not None else self.numel()
        return self.count() / max(total, 1)

    def per_tensor(self) -> Dict[str, int]:
        return {k: int(v.sum()) for k, v in self.items()}


@dataclasses.dataclass
class Counters:
    """Hardware-independent cost of an unlearning step."""

    forward_passes: int = 0  # number of minibatch forward passes
    backward_passes: int = 0  # number of minibatch backward passes
    samples_seen: int = 0  # samples pushed through the model (forward)
    params_touched: int = 0  # parameter entries whose value changed or could change
    importance_cache_hits: int = 0
    importance_cache_misses: int = 0

    def add(self, other: "Counters") -> "Counters":
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class UnlearningRequest:
    """What to forget and what may be used to do it.

    forget: loader over D_f (required).
    retain: loader over D \\ D_f (methods that repair or use a reference on retain data need it).
    train:  loader over the full training set D (forget included); SSD's reference importance.
            When absent, methods that need it concatenate retain and forget.
    task:   how a batch becomes logits and a loss (default: classification with cross-entropy).
    train_key: an optional string identifying the content of ``train`` for the importance cache
            (computed automatically for TensorDataset / excise datasets).
    corrected: loader over Z̃, the corrected versions of the forget samples (fixed labels, text without the
            secret), for correction requests (SAPS); None for a plain removal request.
    holdout: loader over data the model never trained on (e.g. a validation split), for oracle-free calibration
            (``excise.unlearn(..., calibrate=True)``): it tells what "never seen" looks like.
    intent: ``"class"`` (the forget set is every training sample of some classes), ``"sample"`` (chosen or
            random samples), or None: inferred by calibration from the labels of forget and retain.
    """

    forget: Any
    retain: Any = None
    train: Any = None
    task: Any = None
    train_key: Optional[str] = None
    corrected: Any = None
    holdout: Any = None
    intent: Optional[str] = None

    def __post_init__(self) -> None:
        if self.intent not in (None, "class", "sample"):
            raise ValueError(f"intent must be 'class', 'sample' or None (inferred), got {self.intent!r}")
        if self.forget is None:
            raise ValueError("UnlearningRequest needs a forget loader (the data to forget)")
        if self.task is None:
            from .tasks import ClassificationTask

            self.task = ClassificationTask()


@dataclasses.dataclass
class UnlearningResult:
    """The edited model (a copy: the caller's model is untouched) and what it cost."""

    model: nn.Module
    method: str
    hparams: Dict[str, Any]
    mask: Optional[Mask] = None
    seconds: float = 0.0  # wall time of the unlearning step alone (importance + selection + edit)
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)  # per phase
    counters: Counters = dataclasses.field(default_factory=Counters)
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # what the post-checks found (excise.checks): [{"warning": class name, "message": ...}]; empty when all is well
    warnings: list = dataclasses.field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "hparams": self.hparams,
            "seconds": self.seconds,
            "timings": self.timings,
            "counters": self.counters.as_dict(),
            "selected": self.mask.count() if self.mask is not None else None,
            "info": self.info,
            "warnings": self.warnings,
        }
