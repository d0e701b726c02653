"""Edits: operations that change a model given a Mask (each returns a copy unless told otherwise)."""

from .dampen import dampen
from .masked import MaskedOptimizer, Schedule, masked_optimizer, masked_sgd, train_mode
from .project import project, project_one, solve_dual_qp
from .reinit import initialise, initialiser, owners, reinit, without_initialiser

__all__ = ["dampen", "reinit", "initialise", "initialiser", "owners", "without_initialiser", "MaskedOptimizer", "Schedule", "masked_optimizer", "masked_sgd", "train_mode", "project", "project_one",
           "solve_dual_qp"]
