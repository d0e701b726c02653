"""Selective Synaptic Dampening (Foster et al., AAAI 2024) and its label-free (LFSSD) and automatic (ASSD) variants.

Algorithm box:
  1. I_ref ← importance on the reference data — cached per model. Default (``fisher_mode="subset"``): per-sample
     gradient moments of D (one pass, cached) less those of D_f give the retain set's; I_ref = the expected
     batch-mode Fisher of b = min(|D_f|, 256) random retain samples around D's mean gradient. The paper's
     (``fisher_mode="batch"``): the batch-mode Fisher of the loader's batches of D (SSD, LFSSD) or the retain set;
  2. I_f   ← importance on D_f (default: the expected batch-mode Fisher of b of its samples);
  3. select θ_i with I_f,i > α·I_ref,i (α given, or ``alpha="auto"`` — always for ASSD — the percentile
     p = 100 − ln(1 + 100·|D_f|/|D|) of the pooled finite ratios I_f/I_ref);
  4. dampen θ_i ← min(λ·I_ref,i / I_f,i, 1)·θ_i.
"""

from __future__ import annotations

import math
from typing import Optional

from torch.utils.data import ConcatDataset, DataLoader

from .. import importance, selection
from ..edit import dampen
from ..types import Scores, UnlearningResult
from .registry import POS, Param, Real, register, scope_param

# excise's default estimator, fisher_mode="subset" (importance.subset_importance): the paper's batch-mode Fisher
# in expectation over random batches of b = min(|D_f|, 256) samples, from per-sample gradient moments (D's, one
# cached pass, less the forget set's) — the same for any batch size and order of the loaders; the reference is
# b random retain samples around D's mean gradient, so a random forget set scores about 1 at any size and a
# parameter only the forget set moves scores without bound. No α suits every model: where the selection falls off
# a cliff moves with the model (docs/calibration.md); calibrate=True finds α for a model without a retrain oracle.
# Measured on the test suite's committed models: SSD forgets the class within 4 points of retain accuracy for
# α = 100–150 on the small Fashion-MNIST CNN and α = 30–200 on the digits MLP; LFSSD for α = 25–60 on both.
# The paper's estimator (batch-mean gradients of the loader's batches, against D) is preset="paper" /
# fisher_mode="batch", kept bit for bit; "per_sample" is the plain empirical Fisher on D and D_f.
SSD_DEFAULTS = dict(alpha=100.0, lam=1.0, fisher_mode="subset", scope=None)
LFSSD_DEFAULTS = dict(SSD_DEFAULTS, alpha=40.0)
PAPER = dict(alpha=10.0, lam=1.0, fisher_mode="batch")
FISHER_MODES = ("subset", "per_sample", "batch")
SPACE = dict(alpha=Real(1.0, 3000.0, log=True), lam=Real(0.1, 10.0, log=True))
PARAMS = dict(alpha=Param(float, low=0.0, low_open=True, special=("auto",)), lam=POS,
              fisher_mode=Param(str, options=FISHER_MODES), scope=scope_param())
ASSD_PARAMS = {k: v for k, v in PARAMS.items() if k != "alpha"}


def _n_samples(loader) -> int:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        raise ValueError("ASSD needs loaders over sized datasets to compute |D_f| / |D|") from None


def _reference_loader(request, which: str) -> DataLoader:
    if which == "retain":
        if request.retain is None:
            raise ValueError("this method needs a retain loader (UnlearningRequest(retain=...))")
        return request.retain
    if request.train is not None:
        return request.train
    if request.retain is None:
        raise ValueError("SSD needs the full training loader (train=...) or a retain loader to build it from")
    r = request.retain
    if not (isinstance(r, DataLoader) and isinstance(request.forget, DataLoader)):
        raise ValueError("SSD needs train=<loader over D>, or DataLoaders for retain and forget to build it from")
    return DataLoader(ConcatDataset([r.dataset, request.forget.dataset]), batch_size=r.batch_size, shuffle=False)


def _scores(model, loader, ctx, task, label_free: bool, fisher_mode: str, cache: bool, data_key: Optional[str] = None,
            what: str = "data"):
    """The importance of ``loader`` for the batch and per-sample modes; for ``subset``, its gradient moments
    ``(mean, second)``. Returns ``(value, cache status)``."""
    memo = getattr(ctx, "memo", None)  # calibration's trials run on copies of one model: score it once
    key = (what, label_free, fisher_mode)
    if memo is not None and key in memo:
        return memo[key][0], "calibration memo"
    try:
        found = _cached_scores(model, loader, ctx, task, label_free, fisher_mode, cache, data_key)
    except FloatingPointError as e:
        raise FloatingPointError(f"importance on {what}: {e}") from None
    if memo is not None:
        memo[key] = found
    return found


def _pack(mean: Scores, second: Scores) -> Scores:
    packed = Scores({**{f"mean/{k}": v for k, v in mean.items()}, **{f"second/{k}": v for k, v in second.items()}})
    packed.samples = mean.samples
    return packed


def _unpack(packed: Scores):
    out = []
    for part in ("mean/", "second/"):
        s = Scores({k[len(part):]: v for k, v in packed.items() if k.startswith(part)})
        s.samples = packed.samples
        out.append(s)
    return tuple(out)


def _cached_scores(model, loader, ctx, task, label_free, fisher_mode, cache, data_key):
    if fisher_mode == "subset":
        compute = lambda: _pack(*importance.gradient_moments(model, loader, task, label_free,  # noqa: E731
                                                              ctx.counters, ctx.progress))
        est = "moments (label-free)" if label_free else "moments"
    elif label_free:
        compute = lambda: importance.label_free(model, loader, task, ctx.counters, ctx.progress,  # noqa: E731
                                                mode=fisher_mode)
        est = "label_free"
    else:
        compute = lambda: importance.fisher(model, loader, task, fisher_mode, ctx.counters, ctx.progress)  # noqa: E731
        est = "fisher"
    opts = {"mode": fisher_mode, "order_free": fisher_mode != "batch"}
    if not cache:
        scores, status = compute(), "not cached"
    else:
        scores, status = ctx.cached(model, loader, est, compute, opts, data_key=data_key, task=task)
    return (_unpack(scores) if fisher_mode == "subset" else scores), status


def _subset_reference(model, request, ctx, label_free, forget):
    """(I_f, I_ref, cache status, |retain|) for fisher_mode="subset". The reference is the retain set D \\ D_f: its
    moments are D's (one cached pass, reused by every later request on the model) less the forget set's, or the
    retain loader's own when no D is given."""
    if request.train is not None:
        ref, status = _scores(model, request.train, ctx, request.task, label_free, "subset", cache=True,
                              data_key=request.train_key, what="the reference data (D)")
        ref = importance.complement(ref[0], ref[1], forget[0], forget[1])
    else:
        if request.retain is None:
            raise ValueError("this method needs the full training loader (train=...) or a retain loader")
        ref, status = _scores(model, request.retain, ctx, request.task, label_free, "subset", cache=True,
                              what="the reference data (retain)")
    i_f, i_ref = importance.subset_importance(forget[0], forget[1], ref[0], ref[1])
    return i_f, i_ref, status, ref[0].samples


def _run(model, request, ctx, *, alpha, lam, fisher_mode, scope, label_free: bool, reference: str):
    if isinstance(alpha, str) and alpha != "auto":
        raise ValueError(f"alpha must be a positive number or 'auto', got {alpha!r}")
    info = {}
    if fisher_mode == "subset":
        with ctx.timer.phase("importance_forget"):
            forget, _ = _scores(model, request.forget, ctx, request.task, label_free, fisher_mode, cache=False,
                                what="the forget set")
        with ctx.timer.phase("importance_ref"):
            i_f, i_ref, status, n_retain = _subset_reference(model, request, ctx, label_free, forget)
        n_f = forget[0].samples
        n_d = n_retain + n_f
    else:
        ref_loader = _reference_loader(request, reference)
        key = request.train_key if (request.train is not None and ref_loader is request.train) else None
        with ctx.timer.phase("importance_ref"):
            i_ref, status = _scores(model, ref_loader, ctx, request.task, label_free, fisher_mode, cache=True,
                                    data_key=key, what=f"the reference data ({reference if reference == 'retain' else 'D'})")
        with ctx.timer.phase("importance_forget"):
            i_f, _ = _scores(model, request.forget, ctx, request.task, label_free, fisher_mode, cache=False,
                             what="the forget set")
        n_f = n_d = None
    with ctx.timer.phase("select"):
        info["ref_importance_cache"] = status
        eligible = ctx.eligible(model, scope)
        if alpha == "auto":
            if n_f is None:
                n_f, n_ref = _n_samples(request.forget), _n_samples(ref_loader)
                n_d = n_ref + n_f if reference == "retain" else n_ref  # |D|: the reference D already holds D_f
            p = 100.0 - math.log(1.0 + 100.0 * n_f / n_d)
            alpha = selection.ratio_percentile(i_f, i_ref, p, eligible)
            info.update(percentile=p, alpha=alpha)
        mask = selection.ratio(i_f, i_ref, alpha, eligible)
    with ctx.timer.phase("edit"):
        dampen(model, mask, i_f, i_ref, lam, inplace=True)
    ctx.counters.params_touched += mask.count()
    info["selected_fraction"] = mask.fraction(model)
    return UnlearningResult(model=model, method="", hparams={}, mask=mask, info=info)


@register("ssd", defaults=SSD_DEFAULTS, presets={"paper": PAPER}, space=SPACE, params=PARAMS,
          strength=("alpha", -1),
          summary="Selective Synaptic Dampening: Fisher on D vs D_f, dampen where D_f dominates")
def ssd(model, request, ctx, alpha, lam, fisher_mode, scope):
    """SSD: I_D = Fisher on the full training data, I_f on D_f; select I_f > α·I_D; dampen."""
    return _run(model, request, ctx, alpha=alpha, lam=lam, fisher_mode=fisher_mode, scope=scope,
                label_free=False, reference="train")


@register("lfssd", defaults=LFSSD_DEFAULTS, presets={"paper": PAPER}, space=SPACE, params=PARAMS,
          strength=("alpha", -1),
          summary="Label-free SSD: importance from ‖f(x)‖², no labels needed")
def lfssd(model, request, ctx, alpha, lam, fisher_mode, scope):
    """LFSSD: SSD with label-free importance (|∇ mean ‖f(x)‖²|); the loaders need no labels."""
    return _run(model, request, ctx, alpha=alpha, lam=lam, fisher_mode=fisher_mode, scope=scope,
                label_free=True, reference="train")


@register("assd", defaults=dict(lam=1.0, fisher_mode="subset", scope=None), space=dict(lam=SPACE["lam"]),
          presets={"paper": dict(lam=1.0, fisher_mode="batch")}, strength=("lam", -1),
          params=ASSD_PARAMS,
          summary="Automatic SSD: α from a percentile of the I_f/I_retain ratios")
def assd(model, request, ctx, lam, fisher_mode, scope):
    """ASSD: reference importance on the retain set; α = percentile p = 100 − ln(1 + 100·|D_f|/|D|) of I_f/I_ref."""
    return _run(model, request, ctx, alpha="auto", lam=lam, fisher_mode=fisher_mode, scope=scope,
                label_free=False, reference="retain")
