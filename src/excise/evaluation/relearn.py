"""Relearn probe: how fast does forgotten knowledge come back?

The probe fine-tunes a *copy* of the model (the caller's model is untouched) on a small probe loader — a part
of the forget data — and records a metric after given numbers of steps. Compare the curve with the retrain
oracle's under the same probe: a model that only hid the data relearns it much faster than one that never saw it.
This is the one evaluation function that trains, and it says so in its name.
"""

from __future__ import annotations

import copy
from itertools import cycle
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..tasks import Task, get_task, model_device


def relearn_probe(model: nn.Module, probe_loader, metric: Callable[[nn.Module], float],
                  checkpoints: Sequence[int] = (0, 5, 10, 20, 50), lr: float = 0.01, momentum: float = 0.9,
                  task: Optional[Task] = None, seed: int = 0) -> List[Dict[str, float]]:
    """``[{"step": s, "value": metric(model after s SGD steps on probe batches)}]`` for each checkpoint."""
    if not checkpoints or any(s < 0 for s in checkpoints):
        raise ValueError("checkpoints must be non-negative step counts")
    task = get_task(task)
    torch.manual_seed(seed)
    probe = copy.deepcopy(model)
    device = model_device(probe)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum)
    batches = cycle(probe_loader)
    out, done = [], 0
    for target in sorted(set(checkpoints)):
        probe.train()
        while done < target:
            batch = task.to(next(batches), device)
            opt.zero_grad()
            task.loss(probe, batch).backward()
            opt.step()
            done += 1
        probe.eval()
        out.append({"step": target, "value": float(metric(probe))})
    return out
