"""Selective Synaptic Dampening (Foster et al., AAAI 2024) and its label-free (LFSSD) and automatic (ASSD) variants.

Algorithm box:
  1. I_ref ← importance on the reference data (D for SSD/LFSSD, the retain set for ASSD) — cached per model;
  2. I_f   ← importance on D_f;
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
from ..selection import Scope
from ..types import UnlearningResult
from .registry import POS, Param, Real, register, scope_param

# excise's defaults, measured on the shipped Fashion-MNIST protocols (benchmarks/results/ssd.md). With the
# batch-mode Fisher at batch 256 the forget-set batches are single-class and their mean gradients do not
# cancel, so I_f / I_D runs far above 10: the paper's α = 10 dampens 4 % of the weights on class forgetting
# and costs ~25 points of retain accuracy. α = 50 (SSD) and α = 7 (LFSSD) forget the class and keep utility;
# on sub-class and random forgetting, where retraining changes little, they change little too.
SSD_DEFAULTS = dict(alpha=50.0, lam=1.0, fisher_mode="batch", scope=None)
LFSSD_DEFAULTS = dict(SSD_DEFAULTS, alpha=7.0)
PAPER = dict(alpha=10.0, lam=1.0)
SPACE = dict(alpha=Real(1.0, 300.0, log=True), lam=Real(0.1, 10.0, log=True))
PARAMS = dict(alpha=Param(float, low=0.0, low_open=True, special=("auto",)), lam=POS,
              fisher_mode=Param(str, options=("batch", "per_sample")), scope=scope_param())
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


def _eligible(model, scope):
    if scope is None:
        return None
    return (scope if isinstance(scope, Scope) else Scope.parse(scope)).names(model)


def _scores(model, loader, ctx, task, label_free: bool, fisher_mode: str, cache: bool, data_key: Optional[str] = None,
            what: str = "data"):
    try:
        return _cached_scores(model, loader, ctx, task, label_free, fisher_mode, cache, data_key)
    except FloatingPointError as e:
        raise FloatingPointError(f"importance on {what}: {e}") from None


def _cached_scores(model, loader, ctx, task, label_free, fisher_mode, cache, data_key):
    if label_free:
        compute = lambda: importance.label_free(model, loader, task, ctx.counters, ctx.progress)  # noqa: E731
        est, opts = "label_free", {}
    else:
        compute = lambda: importance.fisher(model, loader, task, fisher_mode, ctx.counters, ctx.progress)  # noqa: E731
        est, opts = "fisher", {"mode": fisher_mode}
    if not cache:
        return compute(), "not cached"
    scores, status = ctx.importance_cache.get_or_compute(model, loader, est, compute, opts, data_key=data_key,
                                                         task=task)
    if status == "hit":
        ctx.counters.importance_cache_hits += 1
    elif status == "miss":
        ctx.counters.importance_cache_misses += 1
    return scores, status


def _run(model, request, ctx, *, alpha, lam, fisher_mode, scope, label_free: bool, reference: str):
    if isinstance(alpha, str) and alpha != "auto":
        raise ValueError(f"alpha must be a positive number or 'auto', got {alpha!r}")
    ref_loader = _reference_loader(request, reference)
    key = request.train_key if (request.train is not None and ref_loader is request.train) else None
    with ctx.timer.phase("importance_ref"):
        i_ref, status = _scores(model, ref_loader, ctx, request.task, label_free, fisher_mode, cache=True, data_key=key,
                               what=f"the reference data ({reference if reference == 'retain' else 'D'})")
    with ctx.timer.phase("importance_forget"):
        i_f, _ = _scores(model, request.forget, ctx, request.task, label_free, fisher_mode, cache=False,
                         what="the forget set")
    with ctx.timer.phase("select"):
        eligible = _eligible(model, scope)
        info = {"ref_importance_cache": status}
        if alpha == "auto":
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
          summary="Selective Synaptic Dampening: Fisher on D vs D_f, dampen where D_f dominates")
def ssd(model, request, ctx, alpha, lam, fisher_mode, scope):
    """SSD: I_D = Fisher on the full training data, I_f on D_f; select I_f > α·I_D; dampen."""
    return _run(model, request, ctx, alpha=alpha, lam=lam, fisher_mode=fisher_mode, scope=scope,
                label_free=False, reference="train")


@register("lfssd", defaults=LFSSD_DEFAULTS, presets={"paper": PAPER}, space=SPACE, params=PARAMS,
          summary="Label-free SSD: importance from ‖f(x)‖², no labels needed")
def lfssd(model, request, ctx, alpha, lam, fisher_mode, scope):
    """LFSSD: SSD with label-free importance (|∇ mean ‖f(x)‖²|); the loaders need no labels."""
    return _run(model, request, ctx, alpha=alpha, lam=lam, fisher_mode=fisher_mode, scope=scope,
                label_free=True, reference="train")


@register("assd", defaults=dict(lam=1.0, fisher_mode="batch", scope=None), space=dict(lam=SPACE["lam"]),
          params=ASSD_PARAMS,
          summary="Automatic SSD: α from a percentile of the I_f/I_retain ratios")
def assd(model, request, ctx, lam, fisher_mode, scope):
    """ASSD: reference importance on the retain set; α = percentile p = 100 − ln(1 + 100·|D_f|/|D|) of I_f/I_ref."""
    return _run(model, request, ctx, alpha="auto", lam=lam, fisher_mode=fisher_mode, scope=scope,
                label_free=False, reference="retain")
