"""Membership-inference attacks, each under its own explicit name with its direction and ideal value."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from ..tasks import Task
from .accuracy import predict


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row of a probability matrix (natural log)."""
    p = probs.clamp_min(1e-12)
    return -(probs * p.log()).sum(-1)


def mia_lr_entropy_scores(member: np.ndarray, nonmember: np.ndarray, target: np.ndarray) -> float:
    """Fit logistic regression (balanced class weights) on member (1) vs non-member (0) features and
    return the fraction of ``target`` samples predicted member."""
    from sklearn.linear_model import LogisticRegression

    if len(member) == 0 or len(nonmember) == 0 or len(target) == 0:
        raise ValueError("membership attack needs non-empty member, non-member and target sets")
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
