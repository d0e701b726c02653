"""Importance: a score per parameter entry (Scores), from a pass over a loader."""

from .cache import ImportanceCache, dataset_fingerprint, default_cache, loader_fingerprint
from .fisher import fisher, label_free, sensitivity, summed_gradient
from .hessian import ESTIMATORS as HESSIAN_ESTIMATORS, hessian_diag

__all__ = ["fisher", "label_free", "sensitivity", "summed_gradient", "hessian_diag", "HESSIAN_ESTIMATORS", "ImportanceCache", "default_cache", "loader_fingerprint", "dataset_fingerprint"]
