"""Evaluation: pure functions of a model and data splits. They never train and never subsample silently."""

from .accuracy import accuracy, predict
from .mia import entropy, mia_lr_entropy, mia_lr_entropy_scores

__all__ = ["accuracy", "predict", "entropy", "mia_lr_entropy", "mia_lr_entropy_scores"]
