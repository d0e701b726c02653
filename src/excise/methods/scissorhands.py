"""Scissorhands (Wu & Harandi, ECCV 2024): trim the connections most sensitive to D_f, then repair.

Algorithm box:
  1. s = |θ| ⊙ Σ_b |∇θ L(D_f batch b)| over ``n_batches`` forget batches; one global top-k % over the scope
     (default: every parameter outside normalisation layers);
  2. trim: re-initialise the selected entries (layer's own initialiser, zero biases; zero for a parameter whose
     module has no initialiser, listed in ``info["zeroed"]``);
  3. repair for ``epochs``: at each epoch's start g_o = ∇(−L_f) on a fresh forget batch (eval mode, one per
     memory); each step on a retain batch paired with a forget batch takes g = ∇(L_r − λ·L_f), projected so
     that ⟨g̃, g_o⟩ ≥ 0 (margin m); once forget batches run out, plain L_r steps. SGD (momentum 0.9, weight
     decay 5e-4, constant lr).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from itertools import cycle

import torch
from torch.utils.data import DataLoader

from .. import distributed, importance, selection
from ..edit import reinit, train_mode, without_initialiser
from ..edit.project import flat_grad, project, write_flat_grad
from ..importance.common import eval_mode, progress
from ..tasks import model_device
from ..types import UnlearningResult
from .registry import (COUNT, Context, FRACTION, MAYBE_COUNT, MOMENTUM, NONNEG, POS, SEED, Param, Real, register,
                       scope_param)

@dataclasses.dataclass(frozen=True)
class Repair:
    """The repair phase's hyperparameters, grouped: SGD (``lr``, ``momentum``, ``weight_decay``) on
    L(retain batch) − ``lam``·L(forget batch) for ``epochs`` over the retain set (at most ``max_steps``), batches of
    ``batch_size``; with ``projection``, a step's gradient g with ⟨g, g_mem⟩ < 0 for one of ``memories`` ascent
    directions on the forget set (recomputed every epoch) is projected to g + v·g_mem with v ≥ ``margin`` (GEM), so
    that the repair does not undo the forgetting; ``norm_stats``: "update" or "freeze" the BatchNorm statistics;
    ``optimizer``: "sgd" (with ``momentum``), or "adam" (the Stable Diffusion code's repair)."""

    lam: float
    lr: float
    epochs: int
    max_steps: Optional[int]
    batch_size: int
    margin: float
    memories: int
    momentum: float
    weight_decay: float
    projection: bool
    norm_stats: str
    optimizer: str = "sgd"


PAPER = dict(k=0.03, lam=0.05, lr=5e-3, epochs=10, max_steps=None, batch_size=256)
DEFAULTS = dict(k=0.03, lam=0.05, lr=5e-3, epochs=1, max_steps=None, batch_size=256, n_batches=1, margin=0.5, memories=1,
                momentum=0.9, weight_decay=5e-4, scope="no-norm", projection=True, norm_stats="update", optimizer="sgd",
                seed=0)


def _shuffled(loader, batch_size: int, seed: int) -> DataLoader:
    if not isinstance(loader, DataLoader):
        raise ValueError("scissorhands needs DataLoaders (it reshuffles the forget and retain data)")
    return Context.reshuffled(loader, batch_size, seed)


def _grad_of(model, params, loss) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


PARAMS = dict(k=FRACTION, lam=NONNEG, lr=POS, epochs=COUNT, max_steps=MAYBE_COUNT, batch_size=COUNT,
              n_batches=MAYBE_COUNT, margin=NONNEG, memories=COUNT, momentum=MOMENTUM, weight_decay=NONNEG,
              scope=scope_param(), projection=Param(bool), norm_stats=Param(str, options=("update", "freeze")),
              optimizer=Param(str, options=("sgd", "adam")), seed=SEED)


@register("scissorhands", defaults=DEFAULTS, presets={"paper": PAPER}, params=PARAMS,
          space=dict(k=Real(0.005, 0.2, log=True), lam=Real(0.005, 0.5, log=True), lr=Real(1e-3, 3e-2, log=True)),
          summary="Scissorhands: re-initialise the top-k % by |θ·∇L_f|, repair on retain under a projection",
          strength=("k", 1))
def scissorhands(model, request, ctx, k, n_batches, scope, seed, **repair):
    cfg = Repair(**repair)
    if request.retain is None:
        raise ValueError("scissorhands needs a retain loader for the repair phase")
    task, device = request.task, model_device(model)
    forget = _shuffled(request.forget, cfg.batch_size, seed)
    with ctx.timer.phase("importance_forget"):
        scores = importance.sensitivity(model, forget, task, n_batches, ctx.counters, ctx.progress)
    with ctx.timer.phase("select"):
        eligible = ctx.eligible(model, scope)
        mask = selection.topk(scores, k, eligible)
    with ctx.timer.phase("edit"):
        reinit(model, mask, seed=seed, inplace=True)
        zeroed = without_initialiser(model, [n for n, m in mask.items() if m.any()])
    ctx.counters.params_touched += sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adam" else
           torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
    retain = _shuffled(request.retain, cfg.batch_size, seed + 1)
    reference = cycle(_shuffled(request.forget, cfg.batch_size, seed + 2))
    projections = steps = 0
    with ctx.timer.phase("repair"):
        for epoch in range(cfg.epochs):
            g_mem = None
            if cfg.projection:
                with eval_mode(model):
                    refs = []
                    for _ in range(cfg.memories):
                        b, w = distributed.part(next(reference))
                        if w:
                            b = task.to(b, device)
                            g = _grad_of(model, params, -distributed.weighted(task.loss(model, b), w))
                            ctx.counters.forward_passes += 1
                            ctx.counters.backward_passes += 1
                            ctx.counters.samples_seen += task.batch_size(b)
                        else:  # an empty part: this rank adds nothing to the average
                            g = torch.zeros(sum(p.numel() for p in params), device=device)
                        distributed.average_([g])
                        refs.append(g)
                    g_mem = torch.stack(refs)
            train_mode(model, cfg.norm_stats)
            forget_iter = iter(forget)
            retain_steps = distributed.split(retain, "repair")  # under torch.distributed: this rank's parts
            for rb, w_r in progress(retain_steps, ctx.progress, f"repair {epoch + 1}/{cfg.epochs}"):
                if cfg.max_steps is not None and steps >= cfg.max_steps:
                    break
                fb_all = next(forget_iter, None)
                opt.zero_grad(set_to_none=True)
                loss = None
                if w_r:
                    rb = task.to(rb, device)
                    loss = distributed.weighted(task.loss(model, rb), w_r)
                    ctx.counters.forward_passes += 1
                    ctx.counters.backward_passes += 1
                    ctx.counters.samples_seen += task.batch_size(rb)
                if fb_all is not None:
                    fb, w_f = distributed.part(fb_all)
                    if w_f:
                        fb = task.to(fb, device)
                        ascent = cfg.lam * distributed.weighted(task.loss(model, fb), w_f)
                        loss = -ascent if loss is None else loss - ascent
                        ctx.counters.forward_passes += 1
                        ctx.counters.samples_seen += task.batch_size(fb)
                if not distributed.all_true(loss is None or bool(torch.isfinite(loss))):
                    raise FloatingPointError(f"scissorhands repair diverged at step {steps} (loss "
                                             f"{float(loss.detach()) if loss is not None else 'not finite'}); "
                                             "lower lr or lam")
                if loss is not None:
                    loss.backward()
                distributed.average_grads(params)
                if fb_all is not None and g_mem is not None:
                    g = flat_grad(params)
                    g_new = project(g, g_mem, cfg.margin)
                    if g_new is not g:
                        projections += 1
                        write_flat_grad(params, g_new)
                opt.step()
                steps += 1
            retain_steps.finish()
            model.eval()
    return UnlearningResult(model=model, method="", hparams={}, mask=mask,
                            info={"selected_fraction": mask.fraction(model), "projections": projections,
                                  "repair_steps": steps, "zeroed": zeroed})
