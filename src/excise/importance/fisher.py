"""Diagonal Fisher importance (SSD), its label-free variant (LFSSD), and plain gradient sums (SAPS, SalUn)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..tasks import Task, get_task
from ..types import Counters, Scores
from .common import accumulate_grads
from .per_sample import per_sample_sums, sample_moments


def _task_losses(task: Task):
    def losses(out, batch):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError("the per-sample Fisher needs labelled batches (inputs, labels); for unlabelled "
                            "data use a label-free method (lfssd)")
        return task.loss_from_output(out, task.targets(batch), reduction="none")

    return losses


def _output_energies(out, batch=None):
    """The label-free 'loss' of LFSSD, per sample: ‖f(x_n)‖₂²."""
    return out.float().pow(2).flatten(1).sum(1)


def fisher(model: nn.Module, loader, task: Optional[Task] = None, mode: str = "batch",
           counters: Optional[Counters] = None, progress_bar: bool = False) -> Scores:
    """Diagonal Fisher importance of every parameter that requires grad, in eval mode.

    ``mode="batch"`` (the SSD paper's estimator): I = (1/#batches) Σ_b (∇θ L_b)², L_b the batch-mean loss; it
    moves with the batch size and the batches' makeup. ``mode="per_sample"``: the empirical Fisher diagonal
    I = (1/N) Σ_n (∇θ ℓ_n)² (:mod:`excise.importance.per_sample`), the same for any batching of the same samples;
    the result's ``samples`` is N. SSD's default estimator is :func:`gradient_moments` + :func:`subset_importance`.
    """
    task = get_task(task)
    if mode == "batch":
        return accumulate_grads(model, loader, task, lambda m, b: task.loss(m, b), lambda g: g.pow(2),
                                counters, progress_bar, "fisher (batch)")
    if mode == "per_sample":
        return per_sample_sums(model, loader, task, _task_losses(task), "square", counters, progress_bar,
                               "fisher (per-sample)")
    raise ValueError(f"unknown Fisher mode {mode!r}; expected 'batch' or 'per_sample'")


def label_free(model: nn.Module, loader, task: Optional[Task] = None, counters: Optional[Counters] = None,
               progress_bar: bool = False, mode: str = "batch") -> Scores:
    """LFSSD importance, no labels used. ``mode="batch"`` (the paper's): (1/#batches) Σ_b |∇θ mean_b ‖f(x)‖₂²|;
    ``mode="per_sample"``: (1/N) Σ_n |∇θ ‖f(x_n)‖₂²|, the same for any batching of the data."""
    task = get_task(task)
    if mode == "batch":
        return accumulate_grads(model, loader, task, lambda m, b: _output_energies(task.output(m, b)).mean(),
                                torch.abs, counters, progress_bar, "label-free (batch)")
    if mode == "per_sample":
        return per_sample_sums(model, loader, task, _output_energies, "abs", counters, progress_bar,
                               "label-free (per-sample)")
    raise ValueError(f"unknown label-free mode {mode!r}; expected 'batch' or 'per_sample'")


def gradient_moments(model: nn.Module, loader, task: Optional[Task] = None, label_free: bool = False,
                     counters: Optional[Counters] = None, progress_bar: bool = False) -> Tuple[Scores, Scores]:
    """``(mean, second)`` of the per-sample gradients over every sample of ``loader``: ḡ = (1/N) Σ_n ∇θ ℓ_n and
    F = (1/N) Σ_n (∇θ ℓ_n)², in one pass; ℓ_n is the task's loss, or ‖f(x_n)‖₂² when ``label_free``. Both carry
    ``samples`` = N. Neither depends on the loader's batch size or order (up to float summation)."""
    task = get_task(task)
    losses = _output_energies if label_free else _task_losses(task)
    return sample_moments(model, loader, task, losses, counters, progress_bar,
                          "gradient moments (label-free)" if label_free else "gradient moments")


SUBSET_BATCH = 256  # the batch size b at which subset_importance compares the forget set with the retain set


def subset_importance(forget_mean: Scores, forget_second: Scores, retain_mean: Scores, retain_second: Scores,
                      batch: int = SUBSET_BATCH) -> Tuple[Scores, Scores]:
    """SSD's importances from per-sample gradient moments (``fisher_mode="subset"``), for any loaders.

    With b = min(|D_f|, ``batch``), I is the expected batch-mode Fisher E[ḡ_B²] over random batches B of b
    samples, each batch's mean gradient ḡ_B squared (the paper's estimator, in expectation, with the batching
    fixed by excise instead of the loader):

    - I_f   = ḡ_f² + (F_f − ḡ_f²)/b · (n_f − b)/(n_f − 1): batches of the forget set (ḡ_f² when b = |D_f|);
    - I_ref = ḡ_D² + (F_r − ḡ_r²)/b · (n_r − b)/(n_r − 1): batches of b random retain samples, centred on the
      mean gradient of D = retain ∪ forget (zero at D's optimum, where a trained model sits; the retain set's own
      mean there mirrors the forget set's pull, −|D_f|/|D_r|·ḡ_f, and would hide it).

    I_f / I_ref is then how many times harder the forget set pulls on θ_i than b random samples do: about 1 for
    a random forget set of any size, large where the forget set pulls coherently against little spread in the
    retain set (a class's own features), and unbounded where only the forget set moves θ_i. Returns
    ``(I_f, I_ref)``.
    """
    n_f, n_r = forget_mean.samples, retain_mean.samples
    if n_f is None or n_r is None:
        raise ValueError("subset_importance needs per-sample moments (Scores with .samples)")
    if n_r < 2:
        raise ValueError(f"the retain set has {n_r} samples: at least 2 are needed for its spread")
    b = max(1, min(int(batch), n_f))
    fpc_f = (n_f - b) / (n_f - 1) if n_f > 1 else 0.0
    fpc_r = (n_r - b) / (n_r - 1)
    i_f, i_ref = Scores(), Scores()
    for k in forget_mean:
        g_f, g_r = forget_mean[k], retain_mean[k]
        i_f[k] = g_f.pow(2) + (forget_second[k] - g_f.pow(2)).clamp_min(0) * (fpc_f / b)
        centre = (g_r * n_r + g_f * n_f) / (n_r + n_f)
        i_ref[k] = centre.pow(2) + (retain_second[k] - g_r.pow(2)).clamp_min(0) * (fpc_r / b)
    i_f.samples, i_ref.samples = n_f, n_r
    return i_f, i_ref


def complement(mean: Scores, second: Scores, forget_mean: Scores, forget_second: Scores) -> Tuple[Scores, Scores]:
    """The moments of D \\ D_f from those of D and of D_f ⊆ D (exact up to float; the second moment clamped at 0)."""
    n, n_f = mean.samples, forget_mean.samples
    if n_f >= n:
        raise ValueError(f"the forget set ({n_f} samples) is not smaller than D ({n})")
    out = []
    for whole, part, clamp in ((mean, forget_mean, False), (second, forget_second, True)):
        s = Scores({k: (whole[k] * n - part[k] * n_f) / (n - n_f) for k in whole})
        if clamp:
            s = Scores({k: v.clamp_min(0) for k, v in s.items()})
        s.samples = n - n_f
        out.append(s)
    return out[0], out[1]


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
