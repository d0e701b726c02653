"""Edits: operations that change a model given a Mask (each returns a copy unless told otherwise)."""

from .dampen import dampen

__all__ = ["dampen"]
