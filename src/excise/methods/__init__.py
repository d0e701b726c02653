"""Unlearning methods, registered by name: each is a short composition of importance → selection → edit."""

from .registry import SELECTIVE, available, get_method, register, unlearn

__all__ = ["SELECTIVE", "available", "get_method", "register", "unlearn"]
