"""Membership-inference attacks, each under its own explicit name with its direction and ideal value.

Three attacks from the literature are kept apart on purpose, because repositories report all of them as
"MIA" and their numbers are not comparable:

* ``mia_svc_confidence`` — SalUn / ℓ1-sparse "MIA-Efficacy" (% of D_f predicted *non*-member).
* ``mia_lr_entropy`` — the SSD paper's (fraction of D_f predicted member).
* ``mia_loss_cv`` — the NeurIPS 2023 unlearning challenge starting kit (CV accuracy of forget vs test).

Each ``*_scores`` function works on precomputed features, so it can be tested on synthetic data.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from ..tasks import Task
from .accuracy import predict

FEATURES = ("confidence", "entropy", "modified_entropy", "loss")


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row of a probability matrix (natural log)."""
    p = probs.clamp_min(1e-12)
    return -(probs * p.log()).sum(-1)


def modified_entropy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Song & Mittal (USENIX Security 2021) modified entropy:
    Mentr(p, y) = −(1 − p_y)·log(p_y) − Σ_{i≠y} p_i·log(1 − p_i). Low for confident correct predictions."""
    probs = probs.double()
    py = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    log_p = probs.clamp_min(1e-30).log()
    log_1mp = (1 - probs).clamp_min(1e-30).log()
    others = (probs * log_1mp).sum(1) - py * log_1mp.gather(1, labels.view(-1, 1)).squeeze(1)
    return -(1 - py) * log_p.gather(1, labels.view(-1, 1)).squeeze(1) - others


def features(probs: torch.Tensor, labels: torch.Tensor, kind: str) -> np.ndarray:
    """Per-sample attack feature: ``confidence`` (p_y), ``entropy``, ``modified_entropy`` or ``loss`` (−log p_y)."""
    if kind == "confidence":
        f = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    elif kind == "entropy":
        f = entropy(probs)
    elif kind == "modified_entropy":
        f = modified_entropy(probs, labels)
    elif kind == "loss":
        f = -probs.gather(1, labels.view(-1, 1)).squeeze(1).double().clamp_min(1e-30).log()
    else:
        raise ValueError(f"unknown attack feature {kind!r}; known: {FEATURES}")
    return f.double().numpy()


def _check(*arrays):
    if any(len(a) == 0 for a in arrays):
        raise ValueError("membership attack needs non-empty member, non-member and target sets")


def _subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


def mia_lr_entropy_scores(member: np.ndarray, nonmember: np.ndarray, target: np.ndarray) -> float:
    """Balanced logistic regression on one feature, member (1) vs non-member (0); fraction of ``target``
    predicted member."""
    from sklearn.linear_model import LogisticRegression

    _check(member, nonmember, target)
    x = np.concatenate([member, nonmember]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs")
    clf.fit(x, y)
    return float(clf.predict(np.asarray(target).reshape(-1, 1)).mean())


def mia_lr_entropy(model: nn.Module, retain_loader, test_loader, forget_loader, task: Optional[Task] = None) -> float:
    """The SSD paper's attack: logistic regression (balanced) on softmax entropy, retain = member vs
    test = non-member; returns the fraction of the forget set predicted member (0–1).

    Direction: lower means the forget set looks less like training data. Ideal: the retrain oracle's value.
    Uses every sample of each loader (no subsampling).
    """
    feats = [entropy(predict(model, ld, task)[0]).numpy() for ld in (retain_loader, test_loader, forget_loader)]
    return mia_lr_entropy_scores(*feats)


def mia_svc_scores(member: np.ndarray, nonmember: np.ndarray, target: np.ndarray, seed: int = 0,
                   resolution: Optional[float] = None) -> Dict[str, float]:
    """SalUn's MIA-Efficacy on precomputed features: ``SVC(C=3, gamma="auto", kernel="rbf")`` fitted on up to
    |non-member| members (a seeded random subset when there are more) vs the non-members; returns
    ``{"value": % of target predicted non-member, "members_used": n}``.

    ``resolution``: when given, the training features are rounded to that grid and equal (feature, side) pairs
    are merged into one point weighted by its count. Merging identical points is exact (the SVM with m identical
    points has the same solution as one point with m·C); the rounding is the only approximation. Nearly every
    sample is a support vector of this attack, so the fit is quadratic in the number of distinct points: at
    1e-4 on confidences it runs about ten times faster (the tuner uses it; the benchmark does not).
    """
    from sklearn.svm import SVC

    _check(member, nonmember, target)
    if resolution is not None and not resolution > 0:
        raise ValueError(f"resolution must be a positive grid step, got {resolution!r}")
    member = _subsample(np.asarray(member), len(nonmember), seed)
    x = np.concatenate([member, nonmember])
    y = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    weight = None
    if resolution is not None:
        pairs = np.stack([np.round(x / resolution) * resolution, y], axis=1)
        pairs, weight = np.unique(pairs, axis=0, return_counts=True)
        x, y, weight = pairs[:, 0], pairs[:, 1], weight.astype(np.float64)
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x.reshape(-1, 1), y, sample_weight=weight)
    pred = clf.predict(np.asarray(target).reshape(-1, 1))
    return {"value": 100.0 * float((pred == 0).mean()), "members_used": int(len(member))}


def mia_loss_cv_scores(forget: np.ndarray, test: np.ndarray, n_splits: int = 10, seed: int = 0) -> Dict[str, float]:
    """NeurIPS 2023 starting-kit attack on precomputed losses: logistic regression, forget (1) vs test (0),
    the larger set subsampled (seeded) to the smaller one's size, mean accuracy over ``n_splits`` stratified
    shuffle splits. Returns ``{"value": accuracy (0–1), "per_class": n used per side}``. Ideal ≈ 0.5."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    _check(forget, test)
    n = min(len(forget), len(test))
    if n < n_splits:
        raise ValueError(f"mia_loss_cv needs at least {n_splits} samples on each side, got {n}")
    f, t = _subsample(np.asarray(forget), n, seed), _subsample(np.asarray(test), n, seed + 1)
    x = np.concatenate([f, t]).reshape(-1, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    cv = StratifiedShuffleSplit(n_splits=n_splits, random_state=seed)
    acc = cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy")
    return {"value": float(acc.mean()), "per_class": int(n)}
