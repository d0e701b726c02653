"""Methods for class-conditional diffusion models (excise.diffusion).

- ``esd``: negative guidance in the manner of ESD (Gandikota et al., 2023), on classes instead of prompts. With
  θ* the frozen original, the model's noise prediction for the forgotten class c is trained towards
  ε*(x_t, ∅) − η·(ε*(x_t, c) − ε*(x_t, ∅)) — the unconditional prediction pushed away from the class — on the
  forget set's images noised to x_t (ESD noises the model's own samples of the concept; here the data of the
  class stand in for them), optionally plus ``retain_weight``·L_diff(retain batch).

Scissorhands (trim + repair with L_diff(D_r) − λ·L_diff(D_f)), SalUn (saliency mask + the task's random-label
loss: the forgotten class's condition learns the other classes' images), finetune and retrain run on a
DiffusionTask unchanged.
"""

from __future__ import annotations

import copy
from itertools import cycle

import torch

from ..edit import Schedule, masked_sgd
from ..types import UnlearningResult
from .registry import COUNT, MAYBE_COUNT, MOMENTUM, NONNEG, POS, SEED, Context, Real, register, scope_param

DEFAULTS = dict(eta=1.0, lr=1e-4, epochs=1, max_steps=None, batch_size=64, momentum=0.9, weight_decay=0.0,
                retain_weight=0.0, scope=None, seed=0)
PARAMS = dict(eta=NONNEG, lr=POS, epochs=COUNT, max_steps=MAYBE_COUNT, batch_size=COUNT, momentum=MOMENTUM,
              weight_decay=NONNEG, retain_weight=NONNEG, scope=scope_param(), seed=SEED)


def _diffusion_task(request, method: str):
    task = request.task
    if not hasattr(task, "draws") or not hasattr(task, "scheduler"):  # a custom task named "diffusion"
        raise ValueError(f"{method} unlearns a class-conditional diffusion model: pass "
                         "UnlearningRequest(task=excise.diffusion.DiffusionTask(...))")
    return task


@register("esd", defaults=DEFAULTS, params=PARAMS, strength=("lr", 1), tasks=("diffusion",),
          space=dict(lr=Real(1e-5, 1e-3, log=True), eta=Real(0.5, 4.0, log=True)),
          summary="ESD-style negative guidance (diffusion): ε(x_t, c) → ε*(x_t, ∅) − η(ε*(x_t, c) − ε*(x_t, ∅))")
def esd(model, request, ctx, eta, retain_weight, scope, seed, **hp):
    task = _diffusion_task(request, "esd")
    null = int(getattr(model, "null_class", getattr(task, "null_class", -1)))
    if null < 0:
        raise ValueError("esd needs a model with a null class (classifier-free guidance)")
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    forget = Context.reshuffled(request.forget, hp["batch_size"], seed)
    retain = cycle(Context.reshuffled(request.retain, hp["batch_size"], seed + 1)) \
        if retain_weight and request.retain is not None else None
    eligible = ctx.eligible(model, scope)
    mask = None
    if eligible is not None:
        from ..types import Mask

        mask = Mask({n: torch.full_like(p, n in eligible, dtype=torch.bool) for n, p in model.named_parameters()
                     if p.requires_grad})

    def step_loss(batch, step, total):
        x0, y = batch[0], batch[1]
        t, eps, _ = task.draws(x0, str(step).encode())
        x_t = task.scheduler.add_noise(x0, eps, t)
        with torch.no_grad():
            e_null = frozen((x_t, t, torch.full_like(y, null)))
            e_cls = frozen((x_t, t, y))
            target = e_null - eta * (e_cls - e_null)
        loss = (model((x_t, t, y)) - target).pow(2).mean()
        if retain is not None:
            loss = loss + retain_weight * task.loss(model, task.to(next(retain), x0.device))
        return loss

    schedule = Schedule.of(hp)
    with ctx.timer.phase("edit"):
        steps = masked_sgd(model, forget, step_loss, schedule, task=task, mask=mask, counters=ctx.counters,
                           show=ctx.progress, desc="esd", hint="lower lr")
    return UnlearningResult(model=model, method="", hparams={}, mask=mask, info={"steps": steps})
