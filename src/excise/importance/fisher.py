"""Diagonal Fisher importance (SSD), its label-free variant (LFSSD), and plain gradient sums (SAPS, SalUn)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..tasks import Task, get_task
from ..types import Counters, Scores
from ._common import accumulate_grads, squared_sample_grads


def fisher(model: nn.Module, loader, task: Optional[Task] = None, mode: str = "batch",
           counters: Optional[Counters] = None, progress_bar: bool = False, chunk_size: int = 64) -> Scores:
    """Diagonal Fisher importance of every parameter that requires grad, in eval mode.

    ``mode="batch"`` (the SSD paper's estimator): I = (1/#batches) Σ_b (∇θ L_b)², L_b the batch-mean loss.
    It depends on the batch size. ``mode="per_sample"``: the exact empirical Fisher diagonal,
    (1/N) Σ_i (∇θ ℓ_i)², from per-sample gradients (torch.func), independent of the batching.
    """
    task = get_task(task)
    if mode == "batch":
        return accumulate_grads(model, loader, task, lambda m, b: task.loss(m, b), lambda g: g.pow(2),
                                counters, progress_bar, "fisher (batch)")
    if mode == "per_sample":
        return _per_sample_fisher(model, loader, task, counters, progress_bar, chunk_size)
    raise ValueError(f"unknown Fisher mode {mode!r}; expected 'batch' or 'per_sample'")


def _per_sample_fisher(model, loader, task, counters, show, chunk_size) -> Scores:
    def true_labels(x, y, out):
        if y is None:
            raise TypeError("the per-sample Fisher needs labelled batches (inputs, labels)")
        return [(y, None)]

    return squared_sample_grads(model, loader, task, true_labels, counters, show, "fisher (per-sample)", chunk_size)


def label_free(model: nn.Module, loader, task: Optional[Task] = None, counters: Optional[Counters] = None,
               progress_bar: bool = False) -> Scores:
    """LFSSD importance: loss = batch mean of ‖f(x)‖₂², accumulate |∇θ| over batches (no labels used)."""
    task = get_task(task)

    def output_energy(m, b):
        out = task.output(m, b)
        return out.float().pow(2).flatten(1).sum(1).mean()

    return accumulate_grads(model, loader, task, output_energy, torch.abs, counters, progress_bar, "label-free")


def sensitivity(model: nn.Module, loader, task: Optional[Task] = None, n_batches: Optional[int] = 1,
                counters: Optional[Counters] = None, progress_bar: bool = False) -> Scores:
    """Connection sensitivity (Scissorhands): s = |θ| ⊙ Σ_b |∇θ L_b| over the first ``n_batches`` batches
    (true labels, batch-mean loss; all batches when None), in eval mode. Unnormalised: only the ranking matters."""
    from itertools import islice

    task = get_task(task)
    batches = loader if n_batches is None else list(islice(iter(loader), n_batches))
    summed = accumulate_grads(model, batches, task, lambda m, b: task.loss(m, b), torch.abs, counters,
                              progress_bar, "sensitivity", average=False)
    params = dict(model.named_parameters())
    return Scores({k: v.mul_(params[k].detach().abs().float()) for k, v in summed.items()})


def summed_gradient(model: nn.Module, loader, task: Optional[Task] = None,
                    counters: Optional[Counters] = None, progress_bar: bool = False) -> Scores:
    """Σ_i ∇θ ℓ(z_i) over every sample of the loader, at the current weights (eval mode). SAPS's correction
    gradient is a difference of two of these; SalUn's saliency is the absolute value of one over D_f."""
    task = get_task(task)
    return accumulate_grads(model, loader, task, lambda m, b: task.loss(m, b) * task.batch_size(b), lambda g: g,
                            counters, progress_bar, "gradient", average=False)
