"""The metric registry: every metric excise reports, declared once.

A metric is a pure function of predictions — ``{split: (probs, labels)}`` for the model, and for the retrain
oracle when it needs one — declared with its name, the splits it needs, its direction and ideal, its table title
and whether it enters Avg Gap. Evaluation (:func:`excise.evaluation.evaluate.metrics_from_predictions`), the
tuner's validation metrics, the demo's summary, report columns and the CLI all select from here, so adding a
metric is one function and one :func:`register_metric`::

    @register_metric("brier_forget", needs=("forget",), direction="lower = more confident", ideal="the oracle's")
    def brier_forget(p: Predictions) -> float:
        probs, labels = p.preds["forget"]
        return float(((probs - F.one_hot(labels, probs.shape[1])) ** 2).sum(1).mean())

A function returns its value, or a dict holding its value under its own name plus details reported beside it
(e.g. how many members an attack used). A metric whose splits are missing is left out of the result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .agreement import js_divergence, kl_divergence, prediction_agreement
from .mia import features, mia_loss_cv_scores, mia_lr_entropy_scores, mia_svc_scores

MIA_RESOLUTION = 1e-4  # grid of the tuner's validation attack's features (mia_svc_scores(resolution=...))


@dataclasses.dataclass
class Predictions:
    """What a metric reads: the model's (and the oracle's) predictions per split, the seed of seeded attacks,
    the SVC attack's feature. Accuracies and attack features are computed once and shared between metrics."""

    preds: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    oracle: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None
    seed: int = 0
    mia_feature: str = "confidence"
    # feature matrices (n × d) by name, for distribution metrics (a generator's samples against real data);
    # a metric needing one lists it as "feat:<name>"
    features: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    _memo: Dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False)

    def has(self, need: str) -> bool:
        return need[5:] in self.features if need.startswith("feat:") else need in self.preds

    def splits(self) -> List[str]:
        """The split and ``feat:`` names these predictions hold (what :func:`applicable` takes)."""
        return list(self.preds) + [f"feat:{k}" for k in self.features]

    def acc(self, split: str) -> float:
        """Accuracy (%) on ``split``."""
        if ("acc", split) not in self._memo:
            p, y = self.preds[split]
            self._memo[("acc", split)] = 100.0 * float((p.argmax(-1) == y).float().mean())
        return self._memo[("acc", split)]

    def feature(self, split: str, kind: str) -> np.ndarray:
        if (kind, split) not in self._memo:
            self._memo[(kind, split)] = features(*self.preds[split], kind)
        return self._memo[(kind, split)]

    @property
    def heldout(self) -> str:
        """The held-out split of TA and the SVC attack's non-members: ``test_retain`` when given (class-wise
        forgetting, SalUn's roles), else ``test``."""
        return "test_retain" if "test_retain" in self.preds else "test"


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Predictions], Any]
    needs: Tuple[str, ...]
    direction: str
    ideal: str = "the oracle's"
    title: str = ""
    avg_gap: bool = False  # one of the SalUn paper's Avg Gap metrics
    oracle: bool = False  # needs the oracle's predictions on its splits
    gap: bool = True  # reports state |Δ| to the oracle (gap_<name>)


_METRICS: Dict[str, Metric] = {}


def register_metric(name: str, *, needs: Sequence[str], direction: str, ideal: str = "the oracle's",
                    title: Optional[str] = None, avg_gap: bool = False, oracle: bool = False, gap: bool = True):
    """Decorator: declare ``fn(Predictions) -> value | {name: value, detail: ...}`` as metric ``name``."""
    def deco(fn):
        if name in _METRICS and _METRICS[name].fn is not fn:
            raise ValueError(f"metric {name!r} is already registered")
        _METRICS[name] = Metric(name, fn, tuple(needs), direction, ideal, title or name, avg_gap, oracle, gap)
        return fn
    return deco


def get_metric(name: str) -> Metric:
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; registered: {sorted(_METRICS)}")
    return _METRICS[name]


def metric_names() -> List[str]:
    """Registered metrics, in registration order."""
    return list(_METRICS)


def applicable(splits: Sequence[str]) -> List[str]:
    """The registered metrics whose needs are all among ``splits`` (split and ``feat:`` names)."""
    have = set(splits)
    return [n for n, m in _METRICS.items() if set(m.needs) <= have]


def avg_gap_metrics() -> Tuple[str, ...]:
    return tuple(n for n, m in _METRICS.items() if m.avg_gap)


def gap_metrics() -> Tuple[str, ...]:
    """The metrics whose |Δ| to the oracle reports state (``gap_<name>``)."""
    return tuple(n for n, m in _METRICS.items() if m.gap)


def describe() -> Dict[str, Tuple[str, str]]:
    """``{name: (direction, ideal)}`` of the metrics with a gap: what a report says next to each number."""
    return {n: (m.direction, m.ideal) for n, m in _METRICS.items() if m.gap}


def compute(p: Predictions, names: Optional[Sequence[str]] = None, skip_missing: bool = False) -> Dict[str, Any]:
    """The metrics ``names`` (default: every registered one, those whose splits ``p`` lacks left out), in the
    order named. A metric named explicitly whose splits are missing raises ValueError, unless ``skip_missing``."""
    chosen = [get_metric(n) for n in names] if names is not None else list(_METRICS.values())
    out: Dict[str, Any] = {}
    for m in chosen:
        have = all(p.has(s) for s in m.needs) and (not m.oracle or (
            p.oracle is not None and all(s in p.oracle for s in m.needs if not s.startswith("feat:"))))
        if not have:
            if names is not None and not skip_missing:
                raise ValueError(f"metric {m.name} needs the splits {', '.join(m.needs)}"
                                 f"{' and the oracle' if m.oracle else ''}")
            continue
        value = m.fn(p)
        if isinstance(value, dict):
            out.update(value)
        else:
            out[m.name] = value
    return out


# ---- the built-in metrics (the order is the order of the result's keys) ----

@register_metric("UA", needs=("forget",), direction="higher = more forgotten", title="UA", avg_gap=True)
def unlearning_accuracy(p: Predictions) -> float:
    return 100.0 - p.acc("forget")


@register_metric("forget_acc", needs=("forget",), direction="lower = more forgotten")
def forget_acc(p: Predictions) -> float:
    return p.acc("forget")


@register_metric("RA", needs=("retain",), direction="higher is better", title="RA", avg_gap=True)
def retain_acc(p: Predictions) -> float:
    return p.acc("retain")


@register_metric("TA", needs=("test",), title="TA", avg_gap=True,
                 direction="higher is better (class-wise forgetting: on the other classes' test samples)")
def test_acc(p: Predictions) -> float:
    return p.acc(p.heldout)


@register_metric("TA_all", needs=("test", "test_retain"),
                 direction="accuracy on the whole test set, the forgotten class included (class-wise forgetting)")
def test_acc_all(p: Predictions) -> float:
    return p.acc("test")


@register_metric("VA", needs=("val",), direction="higher is better")
def val_acc(p: Predictions) -> float:
    return p.acc("val")


@register_metric("test_forget_acc", needs=("test_forget",), gap=False,
                 direction="accuracy on the test samples of the forgotten (sub)class")
def test_forget_acc(p: Predictions) -> float:
    return p.acc("test_forget")


@register_metric("corrected_acc", needs=("corrected",),
                 direction="accuracy on the corrected samples with their true labels (relabel requests)")
def corrected_acc(p: Predictions) -> float:
    return p.acc("corrected")


@register_metric("mia_svc_confidence", needs=("forget", "retain", "test"), title="MIA (svc)", avg_gap=True,
                 direction="% of D_f called non-member; higher = more forgotten")
def mia_svc(p: Predictions) -> Dict[str, Any]:
    """SalUn's MIA-Efficacy: SVC on the attack feature, retain (members) vs held-out (non-members)."""
    h = p.heldout
    svc = mia_svc_scores(p.feature("retain", p.mia_feature), p.feature(h, p.mia_feature),
                         p.feature("forget", p.mia_feature), seed=p.seed)
    return {"mia_svc_confidence": svc["value"], "mia_svc_members_used": svc["members_used"]}


@register_metric("mia_lr_entropy", needs=("forget", "retain", "test"), title="MIA (lr-entropy)",
                 direction="% of D_f called member; lower = more forgotten")
def mia_lr_entropy(p: Predictions) -> float:
    """The SSD paper's attack: balanced logistic regression on entropy, retain vs test."""
    return 100.0 * mia_lr_entropy_scores(p.feature("retain", "entropy"), p.feature("test", "entropy"),
                                         p.feature("forget", "entropy"))


@register_metric("mia_loss_cv", needs=("forget", "test"), direction="CV accuracy forget vs test", ideal="≈ 0.5")
def mia_loss_cv(p: Predictions) -> Dict[str, Any]:
    """The NeurIPS 2023 starting kit's attack: logistic regression on the loss, forget vs test."""
    cv = mia_loss_cv_scores(p.feature("forget", "loss"), p.feature("test", "loss"), seed=p.seed)
    return {"mia_loss_cv": cv["value"], "mia_loss_cv_per_class": cv["per_class"]}


@register_metric("per_class_test_acc", needs=("test",), gap=False, direction="accuracy (%) per class on the test set")
def per_class_test_acc(p: Predictions) -> List[Optional[float]]:
    probs, y = p.preds["test"]
    pred = probs.argmax(-1)
    return [100.0 * float((pred[y == c] == c).float().mean()) if (y == c).any() else None
            for c in range(int(probs.shape[1]))]


@register_metric("mia_val", needs=("forget", "val", "members"), gap=False, direction="the tuner's attack: % of D_f called "
                 "non-member by an SVC on confidence, retain subset (members) vs validation split")
def mia_val(p: Predictions) -> float:
    return mia_svc_scores(p.feature("members", "confidence"), p.feature("val", "confidence"),
                          p.feature("forget", "confidence"), seed=p.seed, resolution=MIA_RESOLUTION)["value"]


# ---- a class-conditional generator's samples (excise.diffusion.evaluate builds these splits): "generated_forget"
# and "generated_retain" hold a classifier's probabilities on samples conditioned on the forgotten and the
# other classes, with the conditioned labels; "feat:generated_retain" / "feat:real_retain" the classifier's
# features of those samples and of real images of the other classes

@register_metric("forget_recognised", needs=("generated_forget",), title="forgotten class recognised %",
                 direction="% of samples conditioned on the forgotten class that the classifier calls it; "
                 "lower = more forgotten")
def forget_recognised(p: Predictions) -> float:
    return p.acc("generated_forget")


@register_metric("retain_recognised", needs=("generated_retain",), title="other classes recognised %",
                 direction="% of samples conditioned on the other classes that the classifier recognises; higher "
                 "is better")
def retain_recognised(p: Predictions) -> float:
    return p.acc("generated_retain")


@register_metric("fid_retain", needs=("feat:generated_retain", "feat:real_retain"), title="FID (classifier features)",
                 direction="Fréchet distance between the other classes' samples and real images, in the "
                 "classifier's feature space (not Inception-FID); lower is better")
def fid_retain(p: Predictions) -> float:
    from .generative import frechet_distance

    return frechet_distance(p.features["generated_retain"], p.features["real_retain"])


@register_metric("kid_retain", needs=("feat:generated_retain", "feat:real_retain"), title="KID (classifier features)",
                 direction="kernel (MMD², cubic polynomial) distance between the other classes' samples and real "
                 "images in the classifier's feature space; lower is better")
def kid_retain(p: Predictions) -> float:
    from .generative import kernel_distance

    return kernel_distance(p.features["generated_retain"], p.features["real_retain"])


def _agreement(kind: str, split: str):
    def fn(p: Predictions) -> float:
        mine, ref = p.preds[split][0], p.oracle[split][0]
        if kind == "agree":
            return prediction_agreement(mine, ref)
        return (kl_divergence if kind == "kl" else js_divergence)(ref, mine)
    return fn


_ON = {"forget": "D_f", "test": "test"}
_AGREEMENT = {"agree": ("% same predictions as the oracle on {}", "100"),
              "kl": ("mean KL(oracle ‖ model) on {}", "0"), "js": ("mean JS(oracle, model) on {}", "0")}
for _split in ("forget", "test"):
    for _kind, (_direction, _ideal) in _AGREEMENT.items():
        register_metric(f"{_kind}_{_split}", needs=(_split,), oracle=True, ideal=_ideal,
                        direction=_direction.format(_ON[_split]))(_agreement(_kind, _split))
