"""SAPS (Malekmohammadi, Lee, Xiong 2025): sharpness-aware parameter selection for unlearning features and labels.

Setting (Warnecke et al., NDSS 2023): a group Z of training points must be replaced by corrected versions Z̃
(``request.forget`` = Z, ``request.corrected`` = Z̃; a plain removal request has no Z̃). Algorithm box:
  1. G = Σ_{z̃∈Z̃} ∇ℓ(z̃, θ*) − Σ_{z∈Z} ∇ℓ(z, θ*);
  2. curvature h = diag ∇²L(D̃) at θ* (D̃ = retain ∪ Z̃ by default), by ``estimator``;
  3. select the top ``k`` entries by h (``selector="hessian"``; ablations: ``all``, ``last_layer``, ``random``,
     ``grad_magnitude``);
  4. update only the selected entries S:
     ``first_order``:  θ_S ← θ_S − τ·G_S;
     ``diagonal``:     θ_S ← θ_S − (G_S / N) / (h_S + δ);
     ``second_order``: θ_S ← θ_S − (H_SS + δI)⁻¹ G_S / N, by conjugate gradients with curvature-vector
                       products restricted to S (H = the GGN of the mean loss over D̃ by default — positive
                       semi-definite — or its exact Hessian with ``curvature_product="hessian"``; N = |D̃|);
     ``steps``:        masked fine-tuning on D̃ (masked NegGrad+ on retain vs Z for removal requests; with
                       ``correction_weight`` w, each step also descends w·(L̄(Z̃) − L̄(Z)) on a batch of each).
No reference code was released: every choice above is a parameter; the defaults below were measured on
label correction (benchmarks/results/saps.md).
"""

from __future__ import annotations

import dataclasses

from itertools import cycle
from typing import Optional

import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset

from .. import importance, selection
from ..edit import Schedule, masked_sgd
from ..edit.linalg import conjugate_gradient
from ..importance import summed_gradient
from ..importance.common import trainable
from ..importance.curvature import ggn_vp, hvp
from ..importance.hessian import ESTIMATORS
from ..tasks import model_device
from ..types import Mask, Scores, UnlearningResult
from .registry import (COUNT, FRACTION, MAYBE_COUNT, NONNEG, POS, SEED, UNIT, Choice, Param, Real, register,
                       scope_param)

SELECTORS = ("hessian", "all", "last_layer", "random", "grad_magnitude")
UPDATES = ("first_order", "diagonal", "second_order", "steps")
# Measured on Fashion-MNIST (SmallCNN, 2,500 Coats relabelled Pullover; benchmarks/results/saps.md): on the
# top 1 % by curvature, the CG Newton step (10 iterations, GGN products on a seeded 2,048-sample subset of D̃,
# δ = 0.01) came closest to the retrained oracle at a third of its time; first-order and diagonal steps at
# their textbook scales overshoot when Z is thousands of samples (G sums over Z); 100 masked SGD steps were
# faster and less complete. The diagonal is estimated on a seeded 5,000-sample subset of D̃ (a pass over all
# of D̃ cost more than retraining on 2 CPU cores).
@dataclasses.dataclass(frozen=True)
class Curvature:
    """Where the curvature diagonal of the selection comes from: ``estimator`` (exact, hutchinson with
    ``probes``, ggn_exact, ggn_mc with ``mc_samples``) via ``backend`` (torch or backpack), on the ``curvature``
    data D̃ (corrected: retain + corrected samples; retain; train), a seeded ``curvature_samples`` of it."""

    estimator: str
    backend: str
    curvature: str
    curvature_samples: Optional[int]
    probes: int
    mc_samples: int


@dataclasses.dataclass(frozen=True)
class Update:
    """The update of the selected entries: ``first_order`` θ ← θ − τ·G; ``diagonal`` θ ← θ − G / (|D̃|·(h + δ));
    ``second_order`` θ ← θ − (H + δI)⁻¹ G/|D̃| on the selection by ``cg_iters`` conjugate-gradient steps with
    ``curvature_product`` (ggn or hessian) products on a seeded ``cg_samples`` of D̃; ``steps``: masked SGD."""

    update: str
    tau: float
    delta: float
    cg_iters: int
    cg_samples: Optional[int]
    curvature_product: str


@dataclasses.dataclass(frozen=True)
class Steps:
    """``update="steps"``: masked SGD (``lr``, ``epochs``, at most ``max_steps``, batches of ``batch_size``) on
    β·L(D̃) − (1−β)·L(Z) for a removal (``beta``), plus ``correction_weight``·(L(Z̃) − L(Z)) for a correction."""

    lr: float
    epochs: int
    max_steps: Optional[int]
    beta: float
    batch_size: int
    correction_weight: float


DEFAULTS = dict(k=0.01, selector="hessian", largest=True, estimator="ggn_mc", backend="torch",
                curvature="corrected", curvature_samples=5000, probes=10, mc_samples=1, update="second_order",
                tau=1e-5, delta=0.01, cg_iters=10, cg_samples=2048, curvature_product="ggn", lr=0.01, epochs=1,
                max_steps=100, beta=0.9, batch_size=128, correction_weight=0.0, scope=None, seed=0)


def _n(loader) -> int:
    return len(loader.dataset)


def _concat(a: DataLoader, b: DataLoader) -> DataLoader:
    return DataLoader(ConcatDataset([a.dataset, b.dataset]), batch_size=a.batch_size, shuffle=False)


def _curvature_loader(request, which: str) -> DataLoader:
    if which == "corrected":
        if request.retain is None:
            raise ValueError("SAPS needs a retain loader to form the corrected training set D̃")
        return request.retain if request.corrected is None else _concat(request.retain, request.corrected)
    if which == "retain":
        if request.retain is None:
            raise ValueError("curvature='retain' needs a retain loader")
        return request.retain
    if which == "train":
        if request.train is None:
            raise ValueError("curvature='train' needs a train loader")
        return request.train
    raise ValueError(f"curvature must be 'corrected', 'retain' or 'train', not {which!r}")


def correction_gradient(model, request, counters=None) -> Scores:
    """G = Σ_{Z̃} ∇ℓ − Σ_{Z} ∇ℓ (only the second sum for a removal request)."""
    g_forget = summed_gradient(model, request.forget, request.task, counters)
    if request.corrected is None:
        return Scores({n: -v for n, v in g_forget.items()})
    g_fixed = summed_gradient(model, request.corrected, request.task, counters)
    return Scores({n: g_fixed[n] - g_forget[n] for n in g_forget})


def select(model, selector: str, k: float, g: Scores, curvature_fn, eligible, largest: bool, seed: int) -> Mask:
    if selector == "hessian":
        return selection.topk(curvature_fn(), k, eligible, largest=largest)
    if selector == "grad_magnitude":
        return selection.topk(Scores({n: v.abs() for n, v in g.items()}), k, eligible)
    if selector == "random":
        return selection.random_mask(g, k, eligible, seed)
    if selector == "all":
        names = set(eligible) if eligible is not None else set(g)
        return Mask({n: torch.ones_like(v, dtype=torch.bool) for n, v in g.items() if n in names})
    if selector == "last_layer":
        last = selection.last_layer(model)
        budget = max(1, int(round(k * sum(v.numel() for v in g.values()))))
        sub = Scores({n: g[n].abs() for n in last})
        frac = min(1.0, budget / sum(v.numel() for v in sub.values()))
        mask = selection.topk(sub, frac)
        return Mask({n: mask.get(n, torch.zeros_like(v, dtype=torch.bool)) for n, v in g.items()})
    raise ValueError(f"unknown selector {selector!r}; expected one of {SELECTORS}")


# first-order and diagonal steps overshoot at their textbook scales (above): the tuner searches the other two
SPACE = dict(k=Real(1e-3, 0.1, log=True), update=Choice(("second_order", "steps")), delta=Real(1e-3, 1.0, log=True),
             lr=Real(1e-3, 0.1, log=True), beta=Real(0.5, 0.999), correction_weight=Real(0.0, 1.0))


PARAMS = dict(k=FRACTION, selector=Param(str, options=SELECTORS), largest=Param(bool), estimator=Param(str, options=ESTIMATORS),
              backend=Param(str, options=("torch", "backpack")),
              curvature=Param(str, options=("corrected", "retain", "train")), curvature_samples=MAYBE_COUNT,
              probes=COUNT, mc_samples=COUNT, update=Param(str, options=UPDATES), tau=POS, delta=NONNEG,
              cg_iters=COUNT, cg_samples=MAYBE_COUNT, curvature_product=Param(str, options=("ggn", "hessian")),
              lr=POS, epochs=COUNT, max_steps=MAYBE_COUNT, beta=UNIT, batch_size=COUNT, correction_weight=NONNEG,
              scope=scope_param(), seed=SEED)


@register("saps", defaults=DEFAULTS, space=SPACE, params=PARAMS, strength=("k", 1),
          summary="SAPS: select the largest Hessian-diagonal entries, apply the correction update to them only")
def saps(model, request, ctx, k, selector, largest, scope, seed, **hp):
    cur, upd, st = (group(**{f.name: hp[f.name] for f in dataclasses.fields(group)})
                    for group in (Curvature, Update, Steps))
    if upd.update not in UPDATES:
        raise ValueError(f"unknown update {upd.update!r}; expected one of {UPDATES}")
    task = request.task
    d_tilde = _curvature_loader(request, cur.curvature)
    n_tilde = _n(d_tilde)
    h_loader = _subsample(d_tilde, cur.curvature_samples, seed)  # the diagonal may be estimated on a sample of D̃
    eligible = ctx.eligible(model, scope)
    cache, info = {}, {}

    def curvature_diag():  # computed once, and cached per (model, D̃, estimator) like SSD's reference importance
        if "h" not in cache:
            opts = {"exact": {}, "ggn_exact": {}, "hutchinson": {"probes": cur.probes, "seed": seed},
                    "ggn_mc": {"mc_samples": cur.mc_samples, "seed": seed}}.get(cur.estimator, {})
            with ctx.timer.phase("importance_ref"):
                cache["h"], info["curvature_cache"] = ctx.cached(
                    model, h_loader, f"hessian_diag:{cur.estimator}:{cur.backend}",
                    lambda: importance.hessian_diag(model, h_loader, task, cur.estimator, probes=cur.probes,
                                                    mc_samples=cur.mc_samples, seed=seed, counters=ctx.counters,
                                                    progress_bar=ctx.progress, backend=cur.backend), opts,
                    task=task)
        return cache["h"]

    with ctx.timer.phase("importance_forget"):
        g = correction_gradient(model, request, ctx.counters)
    with ctx.timer.phase("select"):
        mask = select(model, selector, k, g, curvature_diag, eligible, largest, seed)
    named = dict(trainable(model))
    with ctx.timer.phase("edit"):
        if upd.update == "first_order":
            with torch.no_grad():
                for n, m in mask.items():
                    named[n][m] -= upd.tau * g[n][m].to(named[n].dtype)
        elif upd.update == "diagonal":
            h = curvature_diag()
            with torch.no_grad():
                for n, m in mask.items():
                    named[n][m] -= (g[n][m] / n_tilde / (h[n][m] + upd.delta)).to(named[n].dtype)
        elif upd.update == "second_order":
            cg_loader = _subsample(d_tilde, upd.cg_samples, seed)
            info_cg = _newton_step(model, mask, g, cg_loader, task, n_tilde, upd.delta, upd.cg_iters,
                                   upd.curvature_product, ctx)
        else:
            if st.correction_weight < 0:
                raise ValueError(f"correction_weight must be ≥ 0, got {st.correction_weight}")
            _masked_steps(model, mask, request, d_tilde, st, seed, ctx)
    ctx.counters.params_touched += mask.count()
    info.update(selected_fraction=mask.fraction(model), curvature_samples=n_tilde, diagonal_samples=_n(h_loader))
    if upd.update == "second_order":
        info.update(info_cg, cg_samples=_n(cg_loader))
    return UnlearningResult(model=model, method="", hparams={}, mask=mask, info=info)


def _subsample(loader: DataLoader, n: Optional[int], seed: int) -> DataLoader:
    """A seeded random subset of ``n`` of the loader's samples (all of them for None), same batch size."""
    if n is None or n >= _n(loader):
        return loader
    if n < 1:
        raise ValueError(f"cg_samples / curvature_samples must be a positive number of samples or None, got {n}")
    idx = torch.randperm(_n(loader), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    return DataLoader(Subset(loader.dataset, idx), batch_size=loader.batch_size, shuffle=False)


def _newton_step(model, mask, g, d_tilde, task, n_tilde, delta, cg_iters, curvature_product, ctx):
    named = trainable(model)
    sel = [mask.get(n, torch.zeros_like(p, dtype=torch.bool)) for n, p in named]

    def scatter(x):
        out, off = [], 0
        for (n, p), m in zip(named, sel):
            t = torch.zeros_like(p)
            c = int(m.sum())
            t[m] = x[off:off + c].to(p.dtype)
            off += c
            out.append(t)
        return out

    def gather(ts):
        return torch.cat([t[m].reshape(-1) for t, m in zip(ts, sel)])

    b = gather([g.get(n, torch.zeros_like(p)) for n, p in named]).double() / n_tilde

    product = {"ggn": ggn_vp, "hessian": hvp}.get(curvature_product)
    if product is None:
        raise ValueError(f"curvature_product must be 'ggn' or 'hessian', not {curvature_product!r}")

    def matvec(x):  # curvature of the mean loss over the (sub)sampled D̃, restricted to the selected entries
        return gather(product(model, d_tilde, task, scatter(x), ctx.counters)).double() + delta * x

    x, iters, resid = conjugate_gradient(matvec, b, iters=cg_iters)
    with torch.no_grad():
        for (n, p), step in zip(named, scatter(x)):
            p.sub_(step)
    return {"cg_iterations": iters, "cg_relative_residual": resid}


def _masked_steps(model, mask, request, d_tilde, st: Steps, seed, ctx):
    """Masked SGD (:func:`excise.edit.masked_sgd`, BatchNorm statistics frozen) on the mean loss over D̃; for a
    removal request, NegGrad+ (β·L(retain) − (1−β)·L(Z)); with ``correction_weight`` w > 0 on a correction
    request, each step adds w·(L̄(Z̃ batch) − L̄(Z batch)), whose gradient is the correction gradient G of the
    one-shot updates, averaged over the batch."""
    task, device = request.task, model_device(model)
    gen = torch.Generator().manual_seed(seed)
    removal = request.corrected is None
    data = DataLoader(d_tilde.dataset, batch_size=st.batch_size, shuffle=True, generator=gen)
    forget = cycle(DataLoader(request.forget.dataset, batch_size=st.batch_size, shuffle=True, generator=gen)) \
        if (removal or st.correction_weight) else None
    fixed = cycle(DataLoader(request.corrected.dataset, batch_size=st.batch_size, shuffle=True, generator=gen)) \
        if (not removal and st.correction_weight) else None

    def step_loss(batch, step, total):
        loss = task.loss(model, batch)
        if removal:
            return st.beta * loss - (1 - st.beta) * task.loss(model, task.to(next(forget), device))
        if st.correction_weight:
            return loss + st.correction_weight * (task.loss(model, task.to(next(fixed), device))
                                                  - task.loss(model, task.to(next(forget), device)))
        return loss

    schedule = Schedule(lr=st.lr, epochs=st.epochs, max_steps=st.max_steps, momentum=0.9, norm_stats="freeze")
    masked_sgd(model, data, step_loss, schedule,
               task=task, mask=mask, counters=ctx.counters, show=ctx.progress, desc="saps steps",
               hint="lower lr, raise beta or lower correction_weight")
