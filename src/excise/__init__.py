"""excise — machine unlearning for PyTorch.

Find the few parameters that carry the forget data and edit only those:
importance (Scores) → selection (Mask) → edit, composed into methods (ssd, lfssd, assd, ...).

``import excise`` is light: torch and the submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.6.0"

_LAZY = {
    "unlearn": ("excise.api", "unlearn"),
    "available_methods": ("excise.methods.registry", "available"),
    "Scores": ("excise.types", "Scores"),
    "Mask": ("excise.types", "Mask"),
    "Counters": ("excise.types", "Counters"),
    "UnlearningRequest": ("excise.types", "UnlearningRequest"),
    "UnlearningResult": ("excise.types", "UnlearningResult"),
    "ClassificationTask": ("excise.tasks", "ClassificationTask"),
    "LanguageModelTask": ("excise.tasks", "LanguageModelTask"),
    "Task": ("excise.tasks", "Task"),
    "ForgetSpec": ("excise.data.forget", "ForgetSpec"),
    "Splits": ("excise.data.forget", "Splits"),
    "make_splits": ("excise.data.forget", "make_splits"),
    "build_model": ("excise.models", "build_model"),
    "Scope": ("excise.selection", "Scope"),
    "evaluate": ("excise.api", "evaluate"),
    "Report": ("excise.evaluation.report", "Report"),
    "resolve_device": ("excise.types", "resolve_device"),
    "tune": ("excise.tuning", "tune"),
}
_SUBMODULES = {"data", "models", "importance", "selection", "edit", "methods", "evaluation", "training", "tasks",
               "types", "protocol", "bench", "tuning", "distributed"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"excise.{name}")
    raise AttributeError(f"module 'excise' has no attribute {name!r}")
