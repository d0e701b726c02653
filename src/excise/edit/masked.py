"""Masked optimisation: only the selected entries move; frozen entries stay bit-identical.

Plain gradient masking is not enough: weight decay adds λ·θ to the gradient and momentum / Adam moments
keep moving an entry after its gradient is zeroed. ``MaskedOptimizer`` snapshots the frozen entries of each
parameter *and* of every parameter-shaped optimiser state tensor (momentum buffers, Adam's first and second
moments) before ``step()`` and writes them back afterwards, so frozen entries are exactly unchanged with any
torch optimiser.
"""

from __future__ import annotations

import dataclasses

from typing import Callable, Dict, Optional

import torch
from torch import nn

from .. import distributed
from ..selection import NORM_TYPES
from ..types import Mask


class MaskedOptimizer:
    """Wrap ``optimizer`` so that only entries with ``trainable[p] == True`` change.

    ``trainable`` maps parameters to boolean tensors of their shape. Parameters of the optimiser absent from
    ``trainable`` are frozen entirely.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trainable: Dict[nn.Parameter, torch.Tensor]):
        self.optimizer = optimizer
        self.trainable = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                m = trainable.get(p)
                if m is None:
                    m = torch.zeros_like(p, dtype=torch.bool)
                if m.shape != p.shape:
                    raise ValueError(f"mask shape {tuple(m.shape)} does not match parameter shape {tuple(p.shape)}")
                self.trainable[p] = m.to(p.device, torch.bool)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        saved = {}
        for p, m in self.trainable.items():
            if m.all():
                continue
            state = {k: v.clone() for k, v in self.optimizer.state.get(p, {}).items()
                     if torch.is_tensor(v) and v.shape == p.shape}
            saved[p] = (p.detach().clone(), state)
            if p.grad is not None:
                p.grad.masked_fill_(~m, 0.0)
        loss = self.optimizer.step(closure)
        for p, (value, state) in saved.items():
            keep = ~self.trainable[p]
            p.copy_(torch.where(keep, value, p))
            now = self.optimizer.state.get(p, {})
            for k, v in now.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    old = state.get(k)
                    v.copy_(torch.where(keep, old if old is not None else torch.zeros_like(v), v))
        return loss

    def state_dict(self):
        return self.optimizer.state_dict()


def masked_optimizer(model: nn.Module, mask: Optional[Mask], optimizer_cls=torch.optim.SGD, **kwargs) -> MaskedOptimizer:
    """An optimiser over ``model``'s trainable parameters in which only ``mask``'s selected entries move.
    Parameters absent from the mask are frozen. ``mask=None`` trains everything."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if mask is None:
        trainable = {p: torch.ones_like(p, dtype=torch.bool) for _, p in named}
    else:
        unknown = set(mask) - {n for n, _ in named}
        if unknown:
            raise ValueError(f"mask names parameters the model lacks (or that are frozen): {sorted(unknown)[:5]}")
        trainable = {p: mask[n] for n, p in named if n in mask}
    opt = optimizer_cls([p for _, p in named], **kwargs)
    return MaskedOptimizer(opt, trainable)


def train_mode(model: nn.Module, norm_stats: str = "update"):
    """Put the model in train mode, then apply ``norm_stats`` to its normalisation layers (no context)."""
    model.train()
    if norm_stats == "freeze":
        for m in model.modules():
            if isinstance(m, NORM_TYPES):
                m.eval()
    elif norm_stats != "update":
        raise ValueError(f"norm statistics mode must be 'update' or 'freeze', got {norm_stats!r}")
    return model


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a training phase steps: SGD with ``lr``, ``momentum`` and ``weight_decay`` for ``epochs`` over its
    loader, at most ``max_steps`` steps (None: no limit), normalisation statistics ``norm_stats`` ("update" or
    "freeze", :func:`train_mode`). The hyperparameters of the same names, grouped."""

    lr: float
    epochs: int = 1
    max_steps: Optional[int] = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    norm_stats: str = "update"

    @classmethod
    def of(cls, hp: dict, **overrides) -> "Schedule":
        """The schedule in a method's hyperparameters ``hp`` (the fields it has), then ``overrides``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in hp.items() if k in fields}, **overrides})


def masked_sgd(model: nn.Module, loader, step_loss: Callable, schedule: Schedule, *, task,
               mask: Optional[Mask] = None, clip: Optional[float] = None, counters=None, show: bool = False,
               desc: str = "steps", hint: str = "lower lr or max_steps") -> int:
    """SGD by ``schedule`` over ``loader``'s batches in which only ``mask``'s entries move
    (:func:`masked_optimizer`; None: every parameter). ``step_loss(batch, step, total)`` gives one step's loss
    (the batch already on the model's device); ``clip`` bounds the gradient's global norm. Counts passes and
    samples into ``counters``; raises FloatingPointError (with ``hint``) on a non-finite loss. Leaves the model
    in eval mode and returns the number of steps taken."""
    lr, epochs, max_steps = schedule.lr, schedule.epochs, schedule.max_steps
    momentum, weight_decay, norm_stats = schedule.momentum, schedule.weight_decay, schedule.norm_stats
    from ..importance.common import progress
    from ..tasks import model_device

    device = model_device(model)
    opt = masked_optimizer(model, mask, torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    step = 0
    for epoch in range(epochs):
        train_mode(model, norm_stats)
        steps = distributed.split(loader, desc)  # under torch.distributed: this rank's part of each batch
        for batch, weight in progress(steps, show, f"{desc} {epoch + 1}/{epochs}"):
            if step >= total:
                break
            opt.zero_grad()
            if weight:
                loss = step_loss(task.to(batch, device), step, total)
                finite = bool(torch.isfinite(loss))
                if finite:
                    distributed.weighted(loss, weight).backward()
            else:  # an empty part (a batch smaller than the number of ranks): no loss here
                loss, finite = None, True
            if not distributed.all_true(finite):
                raise FloatingPointError(f"{desc}: the loss became "
                                         f"{float(loss.detach()) if loss is not None else 'not finite'} at step "
                                         f"{step}; {hint}")
            distributed.average_grads(model.parameters())
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
            opt.step()
            step += 1
            if counters is not None and weight:
                counters.forward_passes += 1
                counters.backward_passes += 1
                counters.samples_seen += task.batch_size(batch)
        steps.finish()
    model.eval()
    return step
