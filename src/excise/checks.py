"""What excise checks around every request: the input before the work, the result after it.

Before (:func:`validate_request`, raising ``ValueError`` before any pass over the data): the model has
trainable, finite parameters; the forget set is not empty; for index-based loaders over one dataset the
forget indices are unique, inside the training set and disjoint from the retain set.

After (:func:`post_check`, on fixed-size samples, see docs/reliability.md): how many parameter entries
changed, forget- and retain-sample accuracy before and after, and whether the predictions collapsed onto one
class. A suspicious result is not an error — the caller may have wanted it — but it is never silent: each
finding is an :class:`ExciseWarning` subclass, issued with :mod:`warnings`, listed in
``result.warnings``, printed by the CLI and written to ``results.json``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn

# Thresholds of the post-checks (documented in docs/reliability.md).
CHECK_SAMPLES = 512  # at most this many samples of the forget and of the retain loader (the first batches) ...
MIN_CHECK_SAMPLES = 16  # ... at least this many ...
# ... and otherwise n = samples_seen / 40: the request pushed ``samples_seen`` samples through forward (and most
# of them backward) passes; the checks' four forward passes over n samples (forget and retain, before and after)
# then cost about 5 % of it (measured: benchmarks/results/postcheck_cost.md).
CHECK_BUDGET = 1 / 40
FORGET_MOVE = 1.0  # points: forget-sample accuracy that fell by less than this "did not move"
UTILITY_DROP = 5.0  # points: retain-sample accuracy that fell by more than this (and by more than one sample of the
# probe's: on 16 samples one sample is 6.25 points) is a utility loss
COLLAPSE_SHARE = 0.9  # one predicted class on at least this share of the retain sample (and not before) = collapse


class ExciseWarning(UserWarning):
    """Base class of excise's warnings about a result that may not be what the caller wanted."""


class NothingChangedWarning(ExciseWarning):
    """The method selected nothing, or changed no parameter entry: the result is the input model."""


class NothingForgottenWarning(ExciseWarning):
    """The forget-sample accuracy did not move."""


class UtilityDropWarning(ExciseWarning):
    """The retain-sample accuracy fell by more than :data:`UTILITY_DROP` points."""


class CollapseWarning(ExciseWarning):
    """The predictions collapsed onto one class."""


class OffTargetWarning(ExciseWarning):
    """Calibration (``calibrate=`` or ``method="auto"``) found no trial that met the forget target within the
    utility bound: the result is the best it tried, not one on target."""


# --------------------------------------------------------------------------------------------- before the work
def _size(loader) -> Optional[int]:
    ds = getattr(loader, "dataset", None)
    try:
        return len(ds) if ds is not None else len(loader)
    except TypeError:  # an iterable dataset without a length: nothing to check up front
        return None


def _subset_view(loader):
    """``(base dataset, indices)`` for a DataLoader over a ``Subset``; None otherwise."""
    from torch.utils.data import Subset

    ds = getattr(loader, "dataset", None)
    return (ds.dataset, list(ds.indices)) if isinstance(ds, Subset) else None


def _non_finite(model: nn.Module) -> List[str]:
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_floating_point() and not bool(t.isfinite().all())]


def validate_request(model: nn.Module, request, method: str) -> None:
    """Raise a ``ValueError`` naming ``method`` for a request that cannot be carried out (see module docstring)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{method}: the model has no parameter that requires grad (all frozen): nothing can be "
                         "edited")
    bad = _non_finite(model)
    if bad:
        raise ValueError(f"{method}: the input model has non-finite values (NaN or Inf) in {', '.join(bad[:5])}"
                         f"{' …' if len(bad) > 5 else ''}")
    n_forget = _size(request.forget)
    if n_forget == 0:
        raise ValueError(f"{method}: the forget set is empty: there is nothing to forget")
    forget = _subset_view(request.forget)
    if forget is None:
        return
    base, f_idx = forget
    seen: set = set()
    dup = sorted({i for i in f_idx if i in seen or seen.add(i)})
    if dup:
        raise ValueError(f"{method}: the forget set names {len(dup)} samples twice (e.g. indices {dup[:5]})")
    f_set = set(f_idx)
    for loader, bad, why in ((request.retain, f_set.intersection, "are also in the retain set (e.g. indices {}): "
                              "forget and retain must be disjoint"),
                             (request.train, f_set.difference, "are not in the training set D (e.g. indices {}): "
                              "the model never trained on them")):
        view = _subset_view(loader) if loader is not None else None
        if view is not None and view[0] is base:
            found = sorted(bad(view[1]))
            if found:
                raise ValueError(f"{method}: {len(found)} forget samples " + why.format(found[:5]))


# ---------------------------------------------------------------------------------------------- after the work
def take(loader, n: int) -> List[Any]:
    """The loader's first batches, up to ``n`` samples, on the CPU (kept, so before and after see the same).

    Drawing them leaves the caller's random state as it was: the global RNG (a shuffled loader without a
    generator seeds itself from it) and the loader's own generator are restored afterwards."""
    from .distributed import cut
    from .tasks import Task, first_tensor

    if loader is None:
        return []
    gens = {id(g): g for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None),
                                                                      "generator", None)) if g is not None}
    states = {k: g.get_state() for k, g in gens.items()}
    out, count, mover = [], 0, Task()
    try:
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                x = first_tensor(batch[0] if isinstance(batch, (list, tuple)) else batch)  # of the inputs
                size = int(x.shape[0]) if x is not None and x.dim() else 1
                if count + size > n and x is not None and x.dim():  # the last batch cut to n samples in all
                    batch = cut(batch, 0, n - count, size)
                    size = n - count
                out.append(mover.to(batch, torch.device("cpu")))
                count += size
                if count >= n:
                    break
    finally:
        for k, g in gens.items():
            g.set_state(states[k])
    return out


@torch.no_grad()
def _predictions(model: nn.Module, batches: List[Any], task) -> Dict[str, Any]:
    """Accuracy (None without labels) and the most frequent prediction's share, over ``batches``."""
    from .importance.common import eval_mode
    from .tasks import model_device

    if not batches:
        return {"acc": None, "top_share": None, "n": 0}
    device = model_device(model)
    preds, hits, labelled = [], [], True
    with eval_mode(model):
        for b in batches:
            b = task.to(b, device)
            p = task.predict(model, b)
            preds.append(p.reshape(-1).cpu())
            if p.is_floating_point() or p.is_complex():  # not class predictions: nothing to count
                labelled = False
            if labelled:
                try:
                    y = task.labels(b)
                except TypeError:  # a label-free loader
                    labelled = False
                    continue
                if getattr(y, "shape", None) != p.shape:  # not one class per prediction: no accuracy
                    labelled = False
                    continue
                keep = y.reshape(-1) >= 0  # ignore_index targets (e.g. -100) count for nothing
                hits.append((p.reshape(-1) == y.reshape(-1))[keep].cpu())
    p = torch.cat(preds)
    discrete = not (p.is_floating_point() or p.is_complex())  # class predictions; else no share to count
    top = float(torch.bincount(p.long()).max()) / len(p) if discrete and len(p) and p.min() >= 0 else None
    acc = None
    if labelled:
        h = torch.cat(hits)
        acc = 100.0 * float(h.float().mean()) if len(h) else None
    return {"acc": acc, "top_share": top, "n": len(p)}


@dataclasses.dataclass
class Probe:
    """Fixed samples of the forget and retain loaders, and the input model's predictions on them."""

    task: Any
    forget: List[Any]
    retain: List[Any]
    before: Dict[str, Dict[str, Any]]


def check_samples(samples_seen: int) -> int:
    """How many samples of each loader the checks take, for a request that pushed ``samples_seen`` samples."""
    return int(min(CHECK_SAMPLES, max(MIN_CHECK_SAMPLES, CHECK_BUDGET * samples_seen)))


def probe(model: nn.Module, request, n: int = CHECK_SAMPLES) -> Optional[Probe]:
    """Take the samples and score the input model on them (None when the task cannot predict). Called after
    the method ran (the input model is untouched), so that drawing samples cannot change what the method saw."""
    task = request.task
    if not callable(getattr(task, "predict", None)):
        return None
    forget, retain = take(request.forget, n), take(request.retain, n)
    return Probe(task, forget, retain, {"forget": _predictions(model, forget, task),
                                        "retain": _predictions(model, retain, task)})


def _changed_entries(before: nn.Module, after: nn.Module) -> int:
    old = dict(before.named_parameters())
    total = 0
    for name, p in after.named_parameters():
        q = old.get(name)
        if q is None or q.shape != p.shape:
            total += p.numel()
        else:
            total += int((p.detach() != q.detach().to(p.device)).sum())
    return total


def post_check(method: str, original: nn.Module, result, pr: Optional[Probe]) -> List[Dict[str, Any]]:
    """Score the result on the probe's samples; return the findings (and store the numbers in
    ``result.info["checks"]``). The caller issues the warnings."""
    changed = _changed_entries(original, result.model)
    checks: Dict[str, Any] = {"entries_changed": changed}
    if pr is not None:
        after = {"forget": _predictions(result.model, pr.forget, pr.task),
                 "retain": _predictions(result.model, pr.retain, pr.task)}
        for split in ("forget", "retain"):
            checks[split] = {"samples": pr.before[split]["n"], "acc_before": pr.before[split]["acc"],
                             "acc_after": after[split]["acc"], "top_share_before": pr.before[split]["top_share"],
                             "top_share_after": after[split]["top_share"]}
    result.info["checks"] = checks
    selected = result.mask.count() if result.mask is not None else None
    cal = result.info.get("calibration") or {}
    unseen = bool((cal.get("original_judgement") or {}).get("on_target"))
    found = judge(method, checks, selected, original_on_target=unseen) + off_target(method, cal,
                                                                                   result.info.get("auto"))
    return [{"warning": cls.__name__, "message": msg, "category": cls} for cls, msg in found]


def off_target(method: str, calibration: Dict[str, Any], auto: Optional[Dict[str, Any]] = None) -> List[tuple]:
    """``[(OffTargetWarning, message)]`` when a calibrated result's winning trial missed the forget target or broke
    the utility bound (pure; ``[]`` for a result that was not calibrated or is on target)."""
    win = next((t for t in calibration.get("trials", []) if t["trial"] == calibration.get("winner")), None)
    if win is None:
        return []
    j = win["judgement"]
    if j["feasible"] and j["on_target"]:
        return []
    tried = (f"method='auto' tried {', '.join(auto['tried'])}; the best was {method}, "
             if auto and len(auto.get("tried", ())) > 1 else f"{method}: ")
    if not j["feasible"]:
        what = ("collapsed the predictions" if j["collapsed"] else
                f"lost {j['utility_loss']:.1f} points of utility (bound: {calibration['delta']:g})")
        miss = f"every trial broke the utility bound; the result {what}"
    else:
        miss = (f"no trial met the forget target within the utility bound; the result's forget error is "
                f"{j['forget_error']:.1f} points ({j['forget_score']:.1f}× its tolerance; ≤ 1 is on target)")
    return [(OffTargetWarning,
             f"{tried}calibration of {calibration['knob']} in {calibration['trials_run']} trials: {miss}. "
             "The result is the best it tried, not one on target (result.info['calibration']); a larger trial "
             "budget (calibrate={'trials': …}), a larger utility bound ('delta') or another method may reach it")]


_ALREADY = ("calibration found that the original model already meets the forget target: by the holdout given, the "
            "forget set looks like data it never saw (result.info['calibration']['original_judgement']), so no "
            "edit was needed by that test; a larger holdout sharpens it")


def judge(method: str, checks: Dict[str, Any], selected: Optional[int] = None,
          original_on_target: bool = False) -> List[tuple]:
    """The warnings the numbers of :func:`post_check` call for: ``[(warning class, message)]`` (pure).
    ``original_on_target``: calibration judged the input model already on target (the messages say so)."""
    found: List[tuple] = []
    changed = checks["entries_changed"]
    if changed == 0 or selected == 0:
        why = "selected no parameter entry" if selected == 0 else "changed no parameter entry"
        found.append((NothingChangedWarning, f"{method} {why}: the result is the input model, " + (
            _ALREADY if original_on_target else
            "nothing was forgotten (for SSD-style methods: lower alpha, or see `calibrate`)")))
    if "forget" not in checks:
        return found
    f, r = checks["forget"], checks["retain"]
    if changed and f["acc_before"] is not None and f["acc_after"] > f["acc_before"] - FORGET_MOVE:
        found.append((NothingForgottenWarning,
                      f"{method}: accuracy on {f['samples']} forget samples did not move ({f['acc_before']:.1f} → "
                      f"{f['acc_after']:.1f} %); " + (_ALREADY if original_on_target else
                                                     "right only if the forget set already looks like unseen data "
                                                     "to the model, else nothing was forgotten")))
    drop = max(UTILITY_DROP, 100.0 / max(r["samples"], 1))  # points, and more than one sample of the probe's
    if r["acc_before"] is not None and r["acc_after"] < r["acc_before"] - drop:
        found.append((UtilityDropWarning,
                      f"{method}: accuracy on {r['samples']} retain samples fell from {r['acc_before']:.1f} to "
                      f"{r['acc_after']:.1f} % (more than {UTILITY_DROP:g} points and more than one sample): the "
                      "model lost utility"))
    if (r["top_share_after"] is not None and r["top_share_after"] >= COLLAPSE_SHARE
            and r["top_share_before"] < COLLAPSE_SHARE):
        found.append((CollapseWarning,
                      f"{method}: the predictions collapsed: one class on {100 * r['top_share_after']:.0f} % of "
                      f"{r['samples']} retain samples (before: {100 * r['top_share_before']:.0f} %)"))
    return found


def issue(findings: List[Dict[str, Any]], stacklevel: int = 3) -> List[Dict[str, str]]:
    """Issue each finding with :func:`warnings.warn`; return them without their category (JSON-ready)."""
    out = []
    for f in findings:
        warnings.warn(f["message"], f["category"], stacklevel=stacklevel)
        out.append({"warning": f["warning"], "message": f["message"]})
    return out
