"""The minimal report of one model on one forgetting split: UA, RA, TA and the SSD paper's MIA."""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from ..tasks import Task
from .accuracy import accuracy
from .mia import mia_lr_entropy


def basic_metrics(model: nn.Module, forget, retain, test, task: Optional[Task] = None,
                  test_forget=None) -> Dict[str, float]:
    """Forget / retain / test accuracy (%), UA = 100 − forget accuracy, and ``mia_lr_entropy`` (%).

    Every sample of every loader is used. ``test_forget``: the test samples of the forgotten (sub)class, if any.
    """
    fa = accuracy(model, forget, task)
    out = {
        "UA": 100.0 - fa,
        "forget_acc": fa,
        "RA": accuracy(model, retain, task),
        "TA": accuracy(model, test, task),
        "MIA": 100.0 * mia_lr_entropy(model, retain, test, forget, task),
    }
    if test_forget is not None:
        out["test_forget_acc"] = accuracy(model, test_forget, task)
    return out
