"""Accuracy metrics (pure functions: evaluation never trains and never subsamples)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..importance.common import eval_mode
from ..tasks import ClassificationTask, Task, model_device


@torch.no_grad()
def predict(model: nn.Module, loader, task: Optional[Task] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and labels for every sample of ``loader`` (eval mode, no grad).

    Raises FloatingPointError when the model's outputs are not finite on some sample (weights that are finite
    but large enough to overflow an activation: an unlearning step that diverged without a non-finite loss) —
    no metric of such a model means anything."""
    task = task or ClassificationTask()
    device = model_device(model)
    probs, labels = [], []
    with eval_mode(model):
        for batch in loader:
            batch = task.to(batch, device)
            probs.append(torch.softmax(task.output(model, batch).float(), dim=-1).cpu())
            labels.append(task.labels(batch).cpu())
    if not probs:
        raise ValueError("the loader yielded no batch")
    probs = torch.cat(probs)
    bad = int((~torch.isfinite(probs).all(dim=-1)).sum())
    if bad:
        raise FloatingPointError(f"the model's outputs are not finite on {bad} of {len(probs)} samples "
                                 "(an activation overflowed: the model diverged)")
    return probs, torch.cat(labels)


def accuracy(model: nn.Module, loader, task: Optional[Task] = None) -> float:
    """Top-1 accuracy in percent over every sample of ``loader``. Higher is better; ideal for the
    forget set is the retrain oracle's value, not 0."""
    probs, labels = predict(model, loader, task)
    return 100.0 * float((probs.argmax(-1) == labels).float().mean())
