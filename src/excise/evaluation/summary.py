"""The minimal report of one model on one forgetting split: UA, RA, TA and the SSD paper's MIA."""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from ..tasks import Task
from .accuracy import predict
from .mia import entropy, mia_lr_entropy_scores


def basic_metrics(model: nn.Module, forget, retain, test, task: Optional[Task] = None,
                  test_forget=None, test_retain=None) -> Dict[str, float]:
    """Forget / retain / test accuracy (%), UA = 100 − forget accuracy, and ``mia_lr_entropy`` (%).

    One prediction pass per loader; every sample of every loader is used. ``test_forget``: the test
    samples of the forgotten (sub)class, if any. ``test_retain`` (class-wise forgetting): the other classes'
    test samples; TA is then their accuracy (SalUn's role) and ``TA_all`` the whole test set's.
    """
    preds = {k: predict(model, ld, task) for k, ld in
             (("forget", forget), ("retain", retain), ("test", test), ("test_forget", test_forget),
              ("test_retain", test_retain)) if ld is not None}
    acc = {k: 100.0 * float((p.argmax(-1) == y).float().mean()) for k, (p, y) in preds.items()}
    ent = {k: entropy(p).numpy() for k, (p, _) in preds.items()}
    out = {
        "UA": 100.0 - acc["forget"],
        "forget_acc": acc["forget"],
        "RA": acc["retain"],
        "TA": acc.get("test_retain", acc["test"]),
        "MIA": 100.0 * mia_lr_entropy_scores(ent["retain"], ent["test"], ent["forget"]),
    }
    if "test_retain" in acc:
        out["TA_all"] = acc["test"]
    if "test_forget" in acc:
        out["test_forget_acc"] = acc["test_forget"]
    return out
