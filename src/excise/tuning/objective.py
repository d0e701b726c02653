"""The tuner's objective: validation metrics of a trial against the oracle's, never test data."""

from __future__ import annotations

from typing import Any, Dict, List


TUNE_METRICS = ("forget_acc", "VA", "mia_val")
INFEASIBLE = 100.0
DIVERGED = 1000.0
def validation_metrics(model, loaders: Dict[str, Any], seed: int = 0) -> Dict[str, float]:
    """The metrics of ``TUNE_METRICS`` (forget_acc, VA, mia_val; excise.evaluation.metrics) of ``model`` from the
    ``forget``, ``val`` and ``members`` loaders (members: a seeded subset of the retain set as large as val, the
    attack's member side)."""
    from ..evaluation.evaluate import model_predictions
    from ..evaluation.metrics import Predictions, compute

    for need in ("forget", "val", "members"):
        if loaders.get(need) is None:
            raise ValueError(f"validation metrics need the {need} split")
    preds = model_predictions(model, {k: loaders[k] for k in ("forget", "val", "members")})
    return compute(Predictions(preds, seed=seed), TUNE_METRICS)


def _mean(rows: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def avg_gap(metrics: Dict[str, float], oracle: Dict[str, float]) -> float:
    return sum(abs(metrics[k] - oracle[k]) for k in TUNE_METRICS) / len(TUNE_METRICS)


def _validation_loaders(prep, seed: int) -> Dict[str, Any]:
    import torch

    from ..training import seeded_loader

    L = prep.loaders
    if L.get("val") is None or len(L["val"].dataset) == 0:
        raise ValueError("tuning needs a validation split: give the protocol a val_fraction > 0")
    val = L["val"]
    if prep.setup.forget.kind == "class":  # SalUn's roles: VA and the attack's non-members on the other classes
        forgotten = set(prep.train_ds.targets[prep.splits.forget].unique().tolist())
        keep = [i for i in prep.splits.val if int(prep.train_ds.targets[i]) not in forgotten]
        val = seeded_loader(prep.train_ds, keep, val.batch_size)
    n = len(val.dataset)
    retain = list(prep.splits.retain)
    g = torch.Generator().manual_seed(seed)
    pick = [retain[i] for i in torch.randperm(len(retain), generator=g)[: n].tolist()]
    return {"forget": L["forget"], "val": val,
            "members": seeded_loader(prep.train_ds, sorted(pick), val.batch_size)}


