"""Importance: a score per parameter entry (Scores), from a pass over a loader."""

from .cache import ImportanceCache, dataset_fingerprint, default_cache, loader_fingerprint
from .fisher import complement, fisher, gradient_moments, label_free, sensitivity, subset_importance, summed_gradient
from .hessian import ESTIMATORS as HESSIAN_ESTIMATORS, hessian_diag

__all__ = ["fisher", "label_free", "gradient_moments", "subset_importance", "complement", "sensitivity", "summed_gradient", "hessian_diag", "HESSIAN_ESTIMATORS", "ImportanceCache", "default_cache", "loader_fingerprint", "dataset_fingerprint"]
