"""Tasks: how a batch becomes model outputs and a loss.

Methods and importance estimators talk only to a Task, never to cross-entropy directly, so the
same code serves classification now and language modelling or diffusion later.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# On the CPU, work that needs no gradient runs large batches in parts of at most this many samples: whole batches
# of 256 make activation blocks that glibc's allocator hands back to the system and faults in again for the next
# batch (measured here: a ResNet-18 width 16 forward over 3,072 images 0.91 s at 256, 0.58 s in parts of 64; with
# malloc's mmap threshold raised the two ran alike). The per-sample importance passes use it as well.
CPU_PART = 64


def first_tensor(x: Any) -> Optional[torch.Tensor]:
    """``x`` if a tensor, else the first tensor in a dict, list or tuple (depth first); None if there is none."""
    if isinstance(x, torch.Tensor):
        return x
    items = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
    for v in items:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def unsqueezed(x: Any) -> Any:
    """``x`` with a leading dimension of 1 on every tensor, through dicts, lists, tuples and named tuples (one
    sample of a ``vmap`` made a batch of one again)."""
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    if isinstance(x, Mapping):
        return type(x)({k: unsqueezed(v) for k, v in x.items()})
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(unsqueezed(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(unsqueezed(v) for v in x)
    return x


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

    def labels(self, batch: Any) -> Any:
        """What predictions are counted against (accuracy, the post-checks, calibration): here the targets."""
        return self.targets(batch)

    def batch_size(self, batch: Any) -> int:
        """The leading size of the inputs (of their first tensor, for inputs that are a dict, list or tuple)."""
        x = first_tensor(self.inputs(batch))
        if x is None or x.dim() == 0:
            raise TypeError(f"{type(self).__name__}: no batch dimension in inputs of type "
                            f"{type(self.inputs(batch)).__name__}")
        return int(x.shape[0])

    def to(self, batch: Any, device: torch.device) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to(b, device) for b in batch)
        if isinstance(batch, Mapping):
            return type(batch)({k: self.to(v, device) for k, v in batch.items()})
        return batch

    def read_output(self, out: Any) -> Any:
        """What the task's loss reads from the model's return value (here: the value itself)."""
        return out

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``read_output(model(inputs))``. Without gradients, in eval mode, on the CPU, a tensor batch larger than
        :data:`CPU_PART` runs in parts (outputs concatenated: the same values, each sample being computed alone)."""
        x = self.inputs(batch)
        if (torch.is_grad_enabled() or model.training or not isinstance(x, torch.Tensor) or x.dim() == 0
                or x.device.type != "cpu" or x.shape[0] <= CPU_PART):
            return self.read_output(model(x))
        parts = [self.read_output(model(x[:CPU_PART]))]
        if not isinstance(parts[0], torch.Tensor) or parts[0].dim() == 0 or parts[0].shape[0] != CPU_PART:
            return self.read_output(model(x))  # not one output row per sample: run the batch whole
        parts += [self.read_output(model(x[i:i + CPU_PART])) for i in range(CPU_PART, x.shape[0], CPU_PART)]
        return torch.cat(parts)

    def loss_from_output(self, output: torch.Tensor, targets: Any, reduction: str = "mean") -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, reduction: str = "mean") -> torch.Tensor:
        return self.loss_from_output(self.output(model, batch), self.targets(batch), reduction=reduction)

    def random_label_loss(self, model: nn.Module, forget: Any, generator: torch.Generator,
                          other: Any = None) -> torch.Tensor:
        """The loss that teaches the model wrong labels for the ``forget`` batch (random-label forgetting,
        SalUn); ``other``: a batch of the data that stays, for tasks that need one."""
        raise NotImplementedError(f"the {self.name} task defines no random-label forgetting loss")


def _class_indices(targets: torch.Tensor) -> torch.Tensor:
    """Integer labels of any integer dtype (int32 from NumPy or pandas, uint8) as the int64 cross-entropy takes;
    anything else (int64, class-weight rows) as it is."""
    if isinstance(targets, torch.Tensor) and not targets.is_floating_point() and targets.dtype not in (torch.int64,
                                                                                                       torch.bool):
        return targets.long()
    return targets


class ClassificationTask(Task):
    """Batches are ``(inputs, labels)``; the model returns logits; the loss is cross-entropy.

    The logits may also come wrapped as models commonly return them: a tuple or list whose first element they are
    (``(logits, features)``, auxiliary heads), a dict with a ``"logits"`` entry, or an object with a ``.logits``
    tensor (a transformers ``ModelOutput``). Anything else is a ``TypeError`` that says how to adapt it."""

    name = "classification"

    def read_output(self, out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        if isinstance(getattr(out, "logits", None), torch.Tensor):
            return out.logits
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        keys = f" with keys {sorted(map(str, out))[:6]}" if isinstance(out, Mapping) else ""
        raise TypeError(f"{type(self).__name__}: the model returned a {type(out).__name__}{keys}, not logits; it "
                        "reads a tensor (batch, classes), a tuple or list whose first element that is, a dict with "
                        "'logits', or an object with .logits — wrap the model to return one of those, or pass a "
                        "Task whose read_output() finds them")

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

    def labels(self, batch: Any) -> torch.Tensor:
        """The class of each sample: the labels, or for one-hot or soft-label targets (floating point, a row of
        class weights per sample, which the cross-entropy also takes) the class with the most weight."""
        y = self.targets(batch)
        if isinstance(y, torch.Tensor) and y.is_floating_point() and y.dim() >= 2:
            return y.argmax(-1)
        return y

    def loss_from_output(self, output: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(output, _class_indices(targets), reduction=reduction)

    def random_label_loss(self, model: nn.Module, forget: Any, generator: torch.Generator,
                          other: Any = None) -> torch.Tensor:
        """Cross-entropy of the ``forget`` batch against labels drawn uniformly among the *wrong* classes."""
        out = self.output(model, forget)
        y = self.labels(forget)
        shift = torch.randint(1, out.shape[-1], y.shape, generator=generator).to(y.device)
        return self.loss_from_output(out, (y + shift) % out.shape[-1])

    def output_hessian_vp(self, output: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per-sample Hessian of the loss w.r.t. the logits times ``u``: (diag(p) − p pᵀ) u, for the GGN."""
        p = torch.softmax(output.float(), dim=-1).to(u.dtype)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def predict(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.output(model, batch).argmax(dim=-1)

    def sample_targets(self, output: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Labels drawn from the model's predictive distribution (for the Monte-Carlo GGN)."""
        probs = torch.softmax(output.float(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])

    def class_targets(self, output: torch.Tensor):
        """Every label with its probability, ``[(targets, weights)]`` (for the exact GGN diagonal)."""
        if output.dim() != 2:
            raise ValueError("the exact GGN enumerates classes of (batch, classes) outputs only; use ggn_mc")
        probs = torch.softmax(output.float(), dim=-1)
        n = output.shape[0]
        return [(torch.full((n,), c, dtype=torch.long, device=output.device), probs[:, c])
                for c in range(probs.shape[-1])]


class LanguageModelTask(ClassificationTask):
    """Next-token prediction: batches are ``(tokens, next_tokens)`` of shape (batch, length); the model returns
    logits (batch, length, vocab); the loss is the mean cross-entropy over positions (per sample for
    ``reduction="none"``)."""

    name = "language_model"

    def loss_from_output(self, output: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per_token = F.cross_entropy(output.flatten(0, -2), _class_indices(targets).flatten(),
                                    reduction="none").view(targets.shape)
        per_sample = per_token.mean(-1)
        if reduction == "none":
            return per_sample
        if reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()

    def output_hessian_vp(self, output: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(1/T)·blockdiag(diag(p_t) − p_t p_tᵀ) u: the loss averages over the T positions."""
        return super().output_hessian_vp(output, u) / output.shape[-2]


def get_task(task: Any) -> Task:
    """Accept a Task instance, a name (``classification``, ``language_model``), or None (classification)."""
    if task is None or task == "classification":
        return ClassificationTask()
    if task == "language_model":
        return LanguageModelTask()
    if isinstance(task, Task):
        return task
    raise ValueError(f"unknown task {task!r}; expected a Task instance or 'classification'")
