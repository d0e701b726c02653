"""Unlearning methods, registered by name: each is a short composition of importance → selection → edit."""

from .registry import available, get_method, register, unlearn

__all__ = ["available", "get_method", "register", "unlearn"]
