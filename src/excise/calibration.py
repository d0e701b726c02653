"""Oracle-free calibration: choose a method's strength from what a user has, with no retrained model.

A user has the forget set, the retain set and, ideally, data the model never trained on (``holdout``). What a
model retrained without the forget set would do can then be stated without training it:

- **class-like request** (the forget set is every training sample of some classes; inferred when the retain set
  holds none of the forget set's classes, or ``intent="class"``): a model that never saw those classes scores 0 on
  them — on the forget set and on held-out samples of those classes — and keeps its accuracy on the other classes.
  Forget error = the highest of those accuracies (target 0).
- **sample-like request** (chosen or random samples of classes that stay): the forget set must look like held-out
  data of the same classes. Forget error = max(|forget acc − the original's holdout acc|, 100·|AUC − 0.5|), AUC
  being a loss-threshold membership test between forget and holdout samples (0.5 = chance). Needs a holdout loader.

Utility: accuracy on a retain sample and on the holdout sample (for a class request: its other classes) may fall
by at most ``delta`` points from the original's; a result predicting one class for ≥ 90 % of the retain sample is
a collapse.

Search: the method's one declared strength knob (``strength`` in its registration, e.g. SSD's α, a baseline's
learning rate), in its search-space range, on a log scale: the default first, then bisection towards the
weakest setting that meets the forget target without breaking utility; the search stops early at a trial that
is clearly on target (forget score ≤ ``CLEAR``, half the tolerance, and utility loss ≤ delta/2). Seeded; at most ``trials`` runs (each a
full run of the method on a copy of the model; the SSD family reuses the cached reference importance and the
forget importance of the first trial, so a trial costs a re-selection, a dampening and the evaluation; a trial
whose weights were measured already — the original's, or an earlier trial's — is not evaluated again).
Every trial, its criteria and why the winner won are in ``result.info["calibration"]``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checks import COLLAPSE_SHARE

DEFAULT_TRIALS = 10
DELTA = 2.0  # points of utility a calibrated result may lose against the original
FORGET_TOL = 2.0  # points: a forget error at most this meets the target
CLEAR = 0.5  # a trial with forget score ≤ CLEAR and utility loss ≤ delta/2 is clearly on target: the search stops
EVAL_SAMPLES = 1024  # per loader, at most (the first batches: no silent subsampling of what is reported)
# method="auto": cheapest first (the SSD family's trials share one importance pass), then methods that train
AUTO_METHODS = ("ssd", "lfssd", "assd", "scissorhands", "salun", "neggrad_plus")


class CalibrationError(ValueError):
    """The request cannot be calibrated (e.g. a sample-like request without a holdout loader)."""


def _labels(loader, task) -> torch.Tensor:
    out = []
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            out.append(torch.as_tensor(task.labels(batch)).reshape(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def infer_intent(request) -> Tuple[str, List[int]]:
    """``("class", classes)`` when the retain set holds none of the forget set's classes (or ``intent="class"``),
    else ``("sample", classes)``; ``classes``: the labels present in the forget set."""
    task = request.task
    forget = _labels(request.forget, task)
    classes = sorted(int(c) for c in forget.unique() if c >= 0)
    if request.intent is not None:
        return request.intent, classes
    if request.retain is None:
        raise CalibrationError("calibration needs a retain loader (UnlearningRequest(retain=...)) to tell a class "
                               "request from a sample request and to measure utility")
    retain = _labels(request.retain, task)
    shared = bool(torch.isin(retain, torch.tensor(classes, dtype=retain.dtype)).any()) if classes else True
    return ("sample" if shared else "class"), classes


@torch.no_grad()
def _outputs(model: nn.Module, batches: Sequence, task) -> Dict[str, torch.Tensor]:
    from .importance.common import eval_mode
    from .tasks import model_device

    device = model_device(model)
    preds, labels, losses = [], [], []
    with eval_mode(model):
        for b in batches:
            b = task.to(b, device)
            out = task.output(model, b)
            y = task.targets(b)
            preds.append(out.argmax(-1).reshape(-1).cpu())
            labels.append(task.labels(b).reshape(-1).cpu())
            losses.append(task.loss_from_output(out, y, reduction="none").float().reshape(-1).cpu())
    if not preds:
        return {"pred": torch.zeros(0, dtype=torch.long), "label": torch.zeros(0, dtype=torch.long),
                "loss": torch.zeros(0)}
    return {"pred": torch.cat(preds), "label": torch.cat(labels), "loss": torch.cat(losses)}


def _acc(o: Dict[str, torch.Tensor], keep: Optional[torch.Tensor] = None) -> Optional[float]:
    hit = o["pred"] == o["label"]
    if keep is not None:
        hit = hit[keep]
    return 100.0 * float(hit.float().mean()) if len(hit) else None


def auc(members: torch.Tensor, non_members: torch.Tensor) -> float:
    """Area under the ROC curve of the score −loss for telling members from non-members (0.5: chance)."""
    from sklearn.metrics import roc_auc_score

    if not len(members) or not len(non_members):
        return 0.5
    labels = torch.cat([torch.ones(len(members)), torch.zeros(len(non_members))]).numpy()
    return float(roc_auc_score(labels, torch.cat([-members, -non_members]).double().numpy()))


class Evaluator:
    """Fixed samples of forget, retain and holdout, and the original's scores on them."""

    def __init__(self, original: nn.Module, request, intent: str, classes: List[int], n: int = EVAL_SAMPLES):
        from .checks import take

        self.task, self.intent, self.classes = request.task, intent, classes
        self.samples = {k: take(getattr(request, k), n) for k in ("forget", "retain", "holdout")}
        # weights' hash → metrics: a trial that returns weights already measured (e.g. SSD selecting nothing)
        # costs no evaluation
        self.measured: Dict[str, Dict[str, Any]] = {}
        self.base = self.measure(original)
        gone = torch.tensor(classes)
        self.sizes = {"forget": sum(self.task.batch_size(b) for b in self.samples["forget"]),
                      "holdout": sum(int(torch.isin(torch.as_tensor(self.task.labels(b)).reshape(-1), gone).sum())
                                     for b in self.samples["holdout"])}

    def measure(self, model: nn.Module) -> Dict[str, Any]:
        from .storage import state_hash

        key = state_hash(model)
        if key not in self.measured:
            self.measured[key] = self._measure(model)
        return dict(self.measured[key])

    def _measure(self, model: nn.Module) -> Dict[str, Any]:
        o = {k: _outputs(model, v, self.task) for k, v in self.samples.items()}
        m: Dict[str, Any] = {"forget_acc": _acc(o["forget"]), "retain_acc": _acc(o["retain"])}
        preds = o["retain"]["pred"]
        m["top_share"] = float(torch.bincount(preds).max()) / len(preds) if len(preds) else None
        h = o["holdout"]
        if len(h["label"]):
            gone = torch.isin(h["label"], torch.tensor(self.classes, dtype=h["label"].dtype))
            if self.intent == "class":
                m["holdout_forgotten_acc"] = _acc(h, gone) if bool(gone.any()) else None
                m["holdout_other_acc"] = _acc(h, ~gone) if bool((~gone).any()) else None
            else:
                m["holdout_acc"] = _acc(h, gone) if bool(gone.any()) else _acc(h)
                m["mia_auc"] = auc(o["forget"]["loss"], h["loss"][gone] if bool(gone.any()) else h["loss"])
        return m

    def judge(self, m: Dict[str, Any], delta: float) -> Dict[str, Any]:
        """Forget error (points; 0 = on target) and score (error over its tolerance: ≤ 1 meets the target), its
        direction (+1: too little forgetting, −1: too much), utility loss (points), collapse, feasibility."""
        if self.intent == "class":
            accs = [a for a in (m["forget_acc"], m.get("holdout_forgotten_acc")) if a is not None]
            err = max(accs)
            score = err / FORGET_TOL
            sign = 1 if score > 1 else 0
        else:  # the original's holdout accuracy: what data the model never saw scores (an edit that lowers every
            # accuracy alike must not count as "looking unseen"); tolerances: 2 standard errors of what is measured
            gap = m["forget_acc"] - self.base["holdout_acc"]
            n_f, n_h = self.sizes["forget"], self.sizes["holdout"]
            p = min(max(self.base["holdout_acc"] / 100.0, 0.01), 0.99)
            tol_acc = max(FORGET_TOL, 200.0 * math.sqrt(p * (1 - p) / max(n_f, 1)))
            tol_auc = 2.0 * math.sqrt((n_f + n_h + 1) / (12.0 * max(n_f, 1) * max(n_h, 1)))
            err = abs(gap)
            score = max(err / tol_acc, abs(m["mia_auc"] - 0.5) / tol_auc)
            sign = 1 if gap > tol_acc else (-1 if gap < -tol_acc else 0)
        losses = [self.base["retain_acc"] - m["retain_acc"]]
        for k in ("holdout_other_acc", "holdout_acc"):
            if m.get(k) is not None and self.base.get(k) is not None:
                losses.append(self.base[k] - m[k])
        utility_loss = max(losses)
        collapsed = m["top_share"] is not None and m["top_share"] >= COLLAPSE_SHARE \
            and (self.base["top_share"] or 0) < COLLAPSE_SHARE  # the post-checks' definition
        return {"forget_error": err, "forget_score": score, "direction": sign, "utility_loss": utility_loss,
                "collapsed": collapsed, "feasible": utility_loss <= delta and not collapsed, "on_target": score <= 1}


def check_knob(spec, hparams: Dict[str, Any]) -> None:
    """A CalibrationError (a ValueError) unless ``spec`` declares a strength knob and ``hparams`` starts it from a
    number."""
    if spec.strength is None:
        raise CalibrationError(f"{spec.name}: declares no strength to calibrate; methods that do: "
                               f"{', '.join(_calibratable())}")
    name = spec.strength[0]
    if isinstance(hparams[name], bool) or not isinstance(hparams[name], (int, float)):
        raise CalibrationError(f"{spec.name}: calibration searches {name} itself; it cannot start from "
                               f"{name}={hparams[name]!r}")


def _calibratable() -> List[str]:
    from .methods import calibratable

    return calibratable()


def _value(space, s: float):
    """The hyperparameter value at position s ∈ [0, 1] of its range (log scale when the range is)."""
    lo, hi = float(space.low), float(space.high)
    if getattr(space, "log", False):
        v = math.exp(math.log(lo) + s * (math.log(hi) - math.log(lo)))
    else:
        v = lo + s * (hi - lo)
    return int(round(v)) if type(space).__name__ == "Int" else float(f"{v:.6g}")


def _position(space, value) -> float:
    lo, hi = float(space.low), float(space.high)
    v = min(max(float(value), lo), hi)
    if getattr(space, "log", False):
        return (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (v - lo) / (hi - lo)


def _rank(trial: Dict[str, Any]) -> Tuple:
    j = trial["judgement"]
    # feasible first; then on target; then the smallest forget error; then the weakest edit
    return (not j["feasible"], not j["on_target"], round(j["forget_score"], 6), trial["strength_position"])


def calibrate(model: nn.Module, request, spec, hparams: Dict[str, Any], run, *, trials: int = DEFAULT_TRIALS,
              delta: float = DELTA, samples: int = EVAL_SAMPLES, evaluator: Optional[Evaluator] = None):
    """Search ``spec``'s strength knob (see the module docstring). ``run(hp)`` runs the method once on a copy and
    returns its UnlearningResult. Returns the winning result with ``info["calibration"]``."""
    check_knob(spec, hparams)
    if trials < 1:
        raise CalibrationError(f"trials must be ≥ 1, got {trials}")
    if evaluator is None:
        evaluator = prepare(model, request, samples)
    name, sign = spec.strength
    space = spec.space[name]
    to_pos = (lambda v: _position(space, v)) if sign > 0 else (lambda v: 1.0 - _position(space, v))
    from_pos = (lambda s: _value(space, s)) if sign > 0 else (lambda s: _value(space, 1.0 - s))
    lo, hi = 0.0, 1.0  # positions in strength: 0 weakest, 1 strongest
    pos = to_pos(hparams[name])
    original = evaluator.judge(evaluator.base, delta)  # the input model itself, judged by the same criteria
    evaluated = len(evaluator.measured)
    done: List[Dict[str, Any]] = []
    best = None
    for i in range(trials):
        hp = dict(hparams, **{name: hparams[name] if i == 0 else from_pos(pos)})
        result = run(hp)
        metrics = evaluator.measure(result.model)
        j = evaluator.judge(metrics, delta)
        trial = {"trial": i, name: hp[name], "strength_position": round(to_pos(hp[name]), 4), "metrics": metrics,
                 "judgement": j, "seconds": result.seconds}
        done.append(trial)
        if best is None or _rank(trial) < _rank(best[0]):
            best = (trial, result)
        if j["on_target"] and j["feasible"] and (j["forget_score"] <= CLEAR and j["utility_loss"] <= delta / 2
                                                 or i > 0 and hi - lo < 0.02):
            break  # clearly on target (a weaker edit could only spend trials), or the bracket is narrow
        # move: too little forgetting → stronger; too much, or utility lost → weaker
        if j["direction"] > 0 and j["feasible"]:
            lo = max(lo, to_pos(hp[name]))
        else:
            hi = min(hi, to_pos(hp[name]))
        if j["on_target"] and j["feasible"]:  # meets the target: look for a weaker edit that still does
            hi = to_pos(hp[name])
        if hi - lo < 1e-3:
            break
        pos = (lo + hi) / 2
    trial, result = best
    why = _why(trial, done, original)
    result.info["calibration"] = {"method": spec.name, "intent": evaluator.intent, "classes": evaluator.classes,
                                  "knob": name, "delta": delta, "forget_tol": FORGET_TOL, "trials_run": len(done),
                                  "budget": trials, "evaluations": len(evaluator.measured) - evaluated,
                                  "original": evaluator.base, "original_judgement": original,
                                  "trials": done,
                                  "winner": trial["trial"], "why": why}
    return result


def _why(trial, done, original: Optional[Dict[str, Any]] = None) -> str:
    j = trial["judgement"]
    if original is not None and original["on_target"]:
        return (f"the original model already meets the forget target (error {original['forget_error']:.1f} points, "
                f"score {original['forget_score']:.2f} ≤ 1): the forget set looks like held-out data to it, so no edit "
                f"is needed by this test; trial {trial['trial']} ranked best (forget score {j['forget_score']:.2f}, "
                f"utility loss {j['utility_loss']:.1f} points)")
    if j["feasible"] and j["on_target"]:
        return (f"trial {trial['trial']}: the best tried edit that meets the forget target (error "
                f"{j['forget_error']:.1f} points, score {j['forget_score']:.2f} ≤ 1) within the utility bound (loss "
                f"{j['utility_loss']:.1f} points)")
    if j["feasible"]:
        return (f"trial {trial['trial']}: no trial met the forget target within the utility bound; this one came "
                f"closest (forget error {j['forget_error']:.1f}) keeping utility (loss {j['utility_loss']:.1f})")
    return (f"trial {trial['trial']}: no trial kept utility within the bound; this one lost least on the ranking "
            f"(forget error {j['forget_error']:.1f}, utility loss {j['utility_loss']:.1f})")


def prepare(model: nn.Module, request, samples: int = EVAL_SAMPLES) -> Evaluator:
    """Check that ``request`` can be calibrated (a ValueError before any work otherwise) and take its samples."""
    if not callable(getattr(request.task, "predict", None)):
        raise CalibrationError("calibration needs a task that predicts classes (ClassificationTask)")
    if request.retain is None:
        raise CalibrationError("calibration needs a retain loader (UnlearningRequest(retain=...)) to measure utility")
    intent, classes = infer_intent(request)
    if intent == "sample" and request.holdout is None:
        raise CalibrationError(
            "this is a sample-like request (the retain set shares the forget set's classes): calibrating it needs "
            "data the model never trained on, to tell what 'forgotten' looks like — pass UnlearningRequest("
            "holdout=<loader over e.g. a validation split>), or intent='class' if the forget set is whole classes")
    return Evaluator(model, request, intent, classes, samples)


def options(calibrate: Any) -> Dict[str, Any]:
    """``calibrate=True`` or a dict of ``trials`` (≥ 1), ``delta`` (points, ≥ 0) and ``samples`` (per loader)."""
    out = {"trials": DEFAULT_TRIALS, "delta": DELTA, "samples": EVAL_SAMPLES}
    if calibrate is True:
        return out
    if not isinstance(calibrate, dict):
        raise CalibrationError(f"calibrate must be True, False or a dict of {sorted(out)}, got {calibrate!r}")
    unknown = set(calibrate) - set(out)
    if unknown:
        raise CalibrationError(f"unknown calibration options {sorted(unknown)}; known: {sorted(out)}")
    out.update(calibrate)
    if isinstance(out["trials"], bool) or not isinstance(out["trials"], int) or out["trials"] < 1:
        raise CalibrationError(f"calibration trials must be an integer ≥ 1, got {out['trials']!r}")
    if isinstance(out["samples"], bool) or not isinstance(out["samples"], int) or out["samples"] < 1:
        raise CalibrationError(f"calibration samples must be an integer ≥ 1, got {out['samples']!r}")
    if not isinstance(out["delta"], (int, float)) or not math.isfinite(out["delta"]) or out["delta"] < 0:
        raise CalibrationError(f"calibration delta must be a number of points ≥ 0, got {out['delta']!r}")
    return out


def winner(result) -> Optional[Dict[str, Any]]:
    """The winning trial of a calibrated result (None for a result that was not calibrated)."""
    cal = result.info.get("calibration", {})
    return next((t for t in cal.get("trials", []) if t["trial"] == cal.get("winner")), None)


def good_enough(result) -> bool:
    """Whether a calibrated result met its forget target within the utility bound."""
    win = winner(result)
    return bool(win and win["judgement"]["feasible"] and win["judgement"]["on_target"])
