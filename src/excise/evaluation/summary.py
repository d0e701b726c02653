"""The minimal report of one model on one forgetting split: UA, RA, TA and the SSD paper's MIA."""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from ..tasks import Task
from .accuracy import predict
from .metrics import Predictions, compute

SUMMARY_METRICS = ("UA", "forget_acc", "RA", "TA", "mia_lr_entropy", "TA_all", "test_forget_acc")


def basic_metrics(model: nn.Module, forget, retain, test, task: Optional[Task] = None,
                  test_forget=None, test_retain=None) -> Dict[str, Any]:
    """Forget / retain / test accuracy (%), UA = 100 − forget accuracy, and ``mia_lr_entropy`` (%): the metrics
    of ``SUMMARY_METRICS`` (excise.evaluation.metrics) whose splits are given.

    One prediction pass per loader; every sample of every loader is used. ``test_forget``: the test
    samples of the forgotten (sub)class, if any. ``test_retain`` (class-wise forgetting): the other classes'
    test samples; TA is then their accuracy (SalUn's role) and ``TA_all`` the whole test set's.
    """
    preds = {k: predict(model, ld, task) for k, ld in
             (("forget", forget), ("retain", retain), ("test", test), ("test_forget", test_forget),
              ("test_retain", test_retain)) if ld is not None}
    return compute(Predictions(preds), SUMMARY_METRICS, skip_missing=True)
