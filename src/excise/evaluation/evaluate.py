"""All metrics of one model on one split, in one schema (pure: nothing is trained, nothing subsampled
except where an attack's definition says so, and then the row records it)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from ..tasks import Task
from .accuracy import predict
from .agreement import agreement_metrics
from .mia import features, mia_loss_cv_scores, mia_lr_entropy_scores, mia_svc_scores

# metric name → (direction, ideal): what the report says next to each number
METRICS: Dict[str, tuple] = {
    "UA": ("higher = more forgotten", "the oracle's"),
    "RA": ("higher is better", "the oracle's"),
    "TA": ("higher is better (class-wise forgetting: on the other classes' test samples)", "the oracle's"),
    "TA_all": ("accuracy on the whole test set, the forgotten class included (class-wise forgetting)", "the oracle's"),
    "VA": ("higher is better", "the oracle's"),
    "forget_acc": ("lower = more forgotten", "the oracle's"),
    "corrected_acc": ("accuracy on the corrected samples with their true labels (relabel requests)", "the oracle's"),
    "mia_svc_confidence": ("% of D_f called non-member; higher = more forgotten", "the oracle's"),
    "mia_lr_entropy": ("% of D_f called member; lower = more forgotten", "the oracle's"),
    "mia_loss_cv": ("CV accuracy forget vs test", "≈ 0.5"),
    "agree_forget": ("% same predictions as the oracle on D_f", "100"),
    "agree_test": ("% same predictions as the oracle on test", "100"),
    "kl_forget": ("mean KL(oracle ‖ model) on D_f", "0"),
    "kl_test": ("mean KL(oracle ‖ model) on test", "0"),
    "js_forget": ("mean JS(oracle, model) on D_f", "0"),
    "js_test": ("mean JS(oracle, model) on test", "0"),
}
AVG_GAP_METRICS = ("UA", "RA", "TA", "mia_svc_confidence")  # the SalUn paper's Avg Gap


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
    acc = {k: 100.0 * float((p.argmax(-1) == y).float().mean()) for k, (p, y) in preds.items()}
    heldout = "test_retain" if "test_retain" in preds else "test"
    out: Dict[str, Any] = {"UA": 100.0 - acc["forget"], "forget_acc": acc["forget"], "RA": acc["retain"],
                           "TA": acc[heldout]}
    if heldout == "test_retain":
        out["TA_all"] = acc["test"]
    if "val" in acc:
        out["VA"] = acc["val"]
    if "test_forget" in acc:
        out["test_forget_acc"] = acc["test_forget"]
    if "corrected" in acc:
        out["corrected_acc"] = acc["corrected"]
    feat = {k: features(p, y, mia_feature) for k, (p, y) in preds.items()}
    svc = mia_svc_scores(feat["retain"], feat[heldout], feat["forget"], seed=seed)
    out["mia_svc_confidence"] = svc["value"]
    out["mia_svc_members_used"] = svc["members_used"]
    ent = {k: features(p, y, "entropy") for k, (p, y) in preds.items()}
    out["mia_lr_entropy"] = 100.0 * mia_lr_entropy_scores(ent["retain"], ent["test"], ent["forget"])
    loss = {k: features(p, y, "loss") for k, (p, y) in preds.items()}
    cv = mia_loss_cv_scores(loss["forget"], loss["test"], seed=seed)
    out["mia_loss_cv"], out["mia_loss_cv_per_class"] = cv["value"], cv["per_class"]
    p_test, y_test = preds["test"]
    classes = int(p_test.shape[1])
    out["per_class_test_acc"] = [
        100.0 * float((p_test.argmax(-1)[y_test == c] == c).float().mean()) if (y_test == c).any() else None
        for c in range(classes)]
    if oracle_preds is not None:
        out.update(agreement_metrics({k: v[0] for k, v in preds.items()}, {k: v[0] for k, v in oracle_preds.items()}))
    return out


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
    for k in METRICS:
        if k in row and k in oracle_row and row[k] is not None and oracle_row[k] is not None:
            out[f"gap_{k}"] = abs(float(row[k]) - float(oracle_row[k]))
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
