"""Unlearning methods, registered by name: each is a short composition of importance → selection → edit.

Importing this package registers the built-in methods; the registry itself imports none of them. A new method is
one file that calls :func:`register` (imported by the user, or added to the list below)."""

from . import baselines, diffusion, saps, scissorhands, ssd  # noqa: F401  (each registers its methods)
from .registry import SELECTIVE, available, calibratable, get_method, register

__all__ = ["SELECTIVE", "available", "calibratable", "get_method", "register"]
