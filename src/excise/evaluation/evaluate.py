"""All metrics of one model on one split, in one schema (pure: nothing is trained, nothing subsampled
except where an attack's definition says so, and then the row records it)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from ..tasks import Task
from .accuracy import predict
from .metrics import Predictions, avg_gap_metrics, compute, describe, gap_metrics

METRICS: Dict[str, tuple] = describe()  # {name: (direction, ideal)} (see excise.evaluation.metrics)
AVG_GAP_METRICS = avg_gap_metrics()  # the SalUn paper's Avg Gap: UA, RA, TA, mia_svc_confidence


def model_predictions(model: nn.Module, loaders: Dict[str, Any], task: Optional[Task] = None) -> Dict[str, tuple]:
    """``{split: (probs, labels)}`` for every loader given (one pass each)."""
    return {k: predict(model, ld, task) for k, ld in loaders.items() if ld is not None}


def metrics_from_predictions(preds: Dict[str, tuple], oracle_preds: Optional[Dict[str, tuple]] = None,
                             seed: int = 0, mia_feature: str = "confidence") -> Dict[str, Any]:
    """Every metric from the predictions on forget / retain / test (and val, test_forget, test_retain if present).

    With ``test_retain`` (class-wise forgetting: the test samples of the classes that stay) the SalUn paper's
    roles apply: TA is the accuracy on those samples and they are the SVC attack's non-members, since the
    forgotten class's test samples sit exactly where the forget set does (the whole test set's accuracy is kept
    as ``TA_all``). The SSD paper's and the starting kit's attacks keep the whole test set, as they define it."""
    for need in ("forget", "retain", "test"):
        if need not in preds:
            raise ValueError(f"evaluation needs the {need} split")
    return compute(Predictions(preds, oracle_preds, seed, mia_feature))


def evaluate_metrics(model: nn.Module, loaders: Dict[str, Any], oracle: Optional[nn.Module] = None,
                     task: Optional[Task] = None, seed: int = 0, mia_feature: str = "confidence") -> Dict[str, Any]:
    """Metrics of ``model`` on ``loaders`` (forget, retain, test; val, test_forget optional), with agreement
    to ``oracle`` when given."""
    preds = model_predictions(model, loaders, task)
    oracle_preds = model_predictions(oracle, loaders, task) if oracle is not None else None
    return metrics_from_predictions(preds, oracle_preds, seed=seed, mia_feature=mia_feature)


def gaps(row: Dict[str, Any], oracle_row: Dict[str, Any]) -> Dict[str, float]:
    """|Δ| to the oracle for every shared numeric metric, and Avg Gap over UA, RA, TA and mia_svc_confidence."""
    out = {}
    for k in gap_metrics():
        if k in row and k in oracle_row and row[k] is not None and oracle_row[k] is not None:
            out[f"gap_{k}"] = abs(float(row[k]) - float(oracle_row[k]))
    if all(f"gap_{k}" in out for k in AVG_GAP_METRICS):  # rows of a generator have none of them
        out["avg_gap"] = sum(out[f"gap_{k}"] for k in AVG_GAP_METRICS) / len(AVG_GAP_METRICS)
    return out


def evaluate_loaders(model: nn.Module, loaders: Dict[str, Any], oracle: Optional[nn.Module] = None,
                     original: Optional[nn.Module] = None, task: Optional[Task] = None, seed: int = 0,
                     mia_feature: str = "confidence") -> Dict[str, Any]:
    """Score ``model`` (and ``original``, ``oracle`` when given) on a user's loaders: ``forget``, ``retain``,
    ``test`` (required); ``val``, ``test_forget``, ``test_retain``, ``corrected`` (optional; for class-wise
    forgetting pass ``test_retain``, the test samples of the classes that stay: TA and the SVC attack's
    non-members then use them, SalUn's roles). Returns ``{"model": metrics, "original": …, "oracle": …,
    "gaps": {"model": …, "original": …}}``; ``gaps`` (|Δ| per metric and Avg Gap) only with an ``oracle``."""
    if not isinstance(loaders, dict):
        raise TypeError("evaluate(model, data): data is a dict of loaders {'forget', 'retain', 'test', ...} or a "
                        f"shipped protocol's name, got {type(loaders).__name__}")
    missing = [k for k in ("forget", "retain", "test") if loaders.get(k) is None]
    if missing:
        raise ValueError(f"evaluate needs loaders for forget, retain and test; missing: {', '.join(missing)}")
    unknown = set(loaders) - {"forget", "retain", "test", "val", "test_forget", "test_retain", "corrected"}
    if unknown:
        raise ValueError(f"unknown loaders {sorted(unknown)}; known: forget, retain, test, val, test_forget, "
                         "test_retain, corrected")
    oracle_preds = model_predictions(oracle, loaders, task) if oracle is not None else None
    out: Dict[str, Any] = {"model": metrics_from_predictions(model_predictions(model, loaders, task), oracle_preds,
                                                             seed, mia_feature)}
    if original is not None:
        out["original"] = metrics_from_predictions(model_predictions(original, loaders, task), oracle_preds, seed,
                                                   mia_feature)
    if oracle is not None:
        out["oracle"] = metrics_from_predictions(oracle_preds, oracle_preds, seed, mia_feature)
        out["gaps"] = {k: gaps(out[k], out["oracle"]) for k in ("model", "original") if k in out}
    return out
