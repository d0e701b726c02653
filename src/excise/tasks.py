"""Tasks: how a batch becomes model outputs and a loss.

Methods and importance estimators talk only to a Task, never to cross-entropy directly, so the
same code serves classification now and language modelling or diffusion later.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class Task:
    """Interface. A batch is whatever the DataLoader yields; the task knows how to read it."""

    name = "task"

    def inputs(self, batch: Any) -> Any:
        raise NotImplementedError

    def targets(self, batch: Any) -> Any:
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        x = self.inputs(batch)
        return int(x.shape[0])

    def to(self, batch: Any, device: torch.device) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to(b, device) for b in batch)
        if isinstance(batch, dict):
            return {k: self.to(v, device) for k, v in batch.items()}
        return batch

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(self.inputs(batch))

    def loss_from_output(self, output: torch.Tensor, targets: Any, reduction: str = "mean") -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, reduction: str = "mean") -> torch.Tensor:
        return self.loss_from_output(self.output(model, batch), self.targets(batch), reduction=reduction)


class ClassificationTask(Task):
    """Batches are ``(inputs, labels)``; the model returns logits; the loss is cross-entropy."""

    name = "classification"

    def inputs(self, batch: Sequence) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):  # unlabelled loader yielding bare inputs
            return batch
        if not isinstance(batch, (list, tuple)) or len(batch) < 1:
            raise TypeError(
                f"ClassificationTask expects batches of (inputs, labels); got {type(batch).__name__}"
            )
        return batch[0]

    def targets(self, batch: Sequence) -> torch.Tensor:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError(
                "ClassificationTask needs labels: batches must be (inputs, labels). "
                "For unlabelled data use a label-free method (e.g. lfssd)."
            )
        return batch[1]

    def loss_from_output(self, output: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(output, targets, reduction=reduction)

    def output_hessian_vp(self, output: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per-sample Hessian of the loss w.r.t. the logits times ``u``: (diag(p) − p pᵀ) u, for the GGN."""
        p = torch.softmax(output.float(), dim=-1).to(u.dtype)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def predict(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.output(model, batch).argmax(dim=-1)


def get_task(task: Any) -> Task:
    """Accept a Task instance, a name, or None (classification)."""
    if task is None or task == "classification":
        return ClassificationTask()
    if isinstance(task, Task):
        return task
    raise ValueError(f"unknown task {task!r}; expected a Task instance or 'classification'")
