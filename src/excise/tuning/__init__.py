"""Tune a method's hyperparameters against the retrain oracle, on validation data only.

``tune(method, protocol, budget)`` runs ``budget`` trials of a seeded Optuna TPE search over the method's
registered search space (``excise methods`` lists it). A trial unlearns the protocol's original model with
the suggested hyperparameters and scores it with :func:`validation_metrics` — never on test data:

  forget_acc   accuracy on D_f (the data to forget: the user holds it anyway);
  VA           accuracy on the validation split (held out of training, so neither member nor test);
  mia_val      SalUn's SVC attack with the validation split as non-members: % of D_f called non-member
               (features on a 1e-4 grid, ties merged with weights: about ten times faster than the exact fit,
               with the same predictions on the protocols measured; see ``mia_svc_scores``).

The objective ``avg_gap`` is the mean |model − oracle| over those three, the oracle being the retrained model
of the same split. ``floor`` adds a utility floor: a trial whose VA lies more than ``floor`` points below
the reference model's (``floor_ref``: the oracle by default, since for a class request the original's VA
still counts the class being forgotten) is infeasible and scored 100 + its gap, so any feasible trial beats it.
A diverging trial (FloatingPointError: a non-finite loss, weights or outputs) scores 1,000. The method's defaults are the first trial, so the
result is never worse on validation than the defaults.

Studies live in an Optuna journal file (``storage``): a run stopped halfway resumes where it stopped and draws the same trials as a run straight
through (the sampler is re-seeded from each trial's number), and ``budget`` counts every finished trial. Tuned values go into a per-protocol table
(:func:`write_tuned`) that ``excise bench --tuned`` reads.
"""

from .objective import DIVERGED, INFEASIBLE, TUNE_METRICS, _validation_loaders, avg_gap, validation_metrics
from .search import OBJECTIVES, STABILITY_TOLERANCE, TuneResult, default_storage, study_name, tune
from .space import _enqueue_defaults, search_space
from .tables import carry_tuned, check_tuned, record_check, write_tuned

__all__ = ["DIVERGED", "INFEASIBLE", "OBJECTIVES", "STABILITY_TOLERANCE", "TUNE_METRICS", "TuneResult", "avg_gap",
           "carry_tuned", "check_tuned", "default_storage", "record_check", "search_space", "study_name", "tune",
           "validation_metrics", "write_tuned"]
