"""Diagonal curvature of the training loss at the trained weights (SAPS selects the largest entries).

The target is the diagonal of the Hessian of the mean loss over the loader's samples,
H = (1/N) Σ_i ∇²θ ℓ_i, computed in eval mode. Estimators:

* ``exact``      — one double-backward per parameter entry (tiny models; the test oracle);
* ``hutchinson`` — E[v ⊙ Hv] with Rademacher probes v (Hessian-vector products);
* ``ggn_exact``  — the generalised Gauss–Newton diagonal, Σ_c p_c(x)·(∇θ ℓ(x, c))² per sample (one
                   per-sample backward per output class);
* ``ggn_mc``     — the same with labels drawn from the model's predictive distribution (``mc_samples`` per
                   input): unbiased for the GGN diagonal at about the cost of a per-sample Fisher pass.

For softmax cross-entropy the GGN equals the Hessian when the network is linear in its parameters; for
ReLU networks it drops the network's own second-order terms.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..tasks import Task, get_task, model_device
from ..types import Counters, Scores
from ._common import eval_mode, progress, squared_sample_grads, trainable

ESTIMATORS = ("exact", "hutchinson", "ggn_exact", "ggn_mc")


def hessian_diag(model: nn.Module, loader, task: Optional[Task] = None, method: str = "ggn_mc", probes: int = 10,
                 mc_samples: int = 1, seed: int = 0, counters: Optional[Counters] = None,
                 progress_bar: bool = False, chunk_size: int = 64) -> Scores:
    """Diagonal of the loss curvature for every parameter that requires grad (see the module docstring)."""
    task = get_task(task)
    if method == "exact":
        return _exact(model, loader, task, counters, progress_bar)
    if method == "hutchinson":
        if probes < 1:
            raise ValueError(f"hutchinson needs at least one probe, got {probes}")
        return _hutchinson(model, loader, task, probes, seed, counters, progress_bar)
    if method == "ggn_exact":
        return squared_sample_grads(model, loader, task, lambda x, y, out: task.class_targets(out), counters,
                                    progress_bar, "ggn (exact)", chunk_size)
    if method == "ggn_mc":
        if mc_samples < 1:
            raise ValueError(f"ggn_mc needs mc_samples ≥ 1, got {mc_samples}")
        gen = torch.Generator(device=model_device(model)).manual_seed(seed)

        def sampled(x, y, out):
            w = torch.full((len(x),), 1.0 / mc_samples, device=x.device)
            return [(task.sample_targets(out, gen), w) for _ in range(mc_samples)]

        return squared_sample_grads(model, loader, task, sampled, counters, progress_bar, "ggn (monte carlo)",
                                    chunk_size)
    raise ValueError(f"unknown Hessian-diagonal estimator {method!r}; expected one of {ESTIMATORS}")


def _second_order_pass(model, loader, task, counters, show, desc, accumulate) -> Scores:
    """Shared loop: for each batch, gradients of n_b·L_b with a graph, then ``accumulate(acc, grads, params)``
    adds that batch's diagonal contribution (and returns how many extra backward passes it made); the sum is
    divided by N, the number of samples."""
    named = trainable(model)
    params = [p for _, p in named]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device, total = model_device(model), 0
    with eval_mode(model):
        for batch in progress(loader, show, desc):
            batch = task.to(batch, device)
            n = task.batch_size(batch)
            grads = torch.autograd.grad(task.loss(model, batch) * n, params, create_graph=True)
            backward = accumulate(acc, grads, params)
            total += n
            if counters is not None:
                counters.forward_passes += 1
                counters.backward_passes += backward
                counters.samples_seen += n
    if total == 0:
        raise ValueError(f"{desc}: the loader yielded no sample")
    return Scores({name: a.div_(total) for (name, _), a in zip(named, acc)})


def _exact(model, loader, task, counters, show) -> Scores:
    def accumulate(acc, grads, params):
        passes = 0
        for a, g, p in zip(acc, grads, params):
            flat = g.reshape(-1)
            for j in range(flat.numel()):
                (h,) = torch.autograd.grad(flat[j], p, retain_graph=True)
                a.view(-1)[j] += h.reshape(-1)[j].float()
                passes += 1
        return passes

    return _second_order_pass(model, loader, task, counters, show, "hessian (exact)", accumulate)


def _hutchinson(model, loader, task, probes, seed, counters, show) -> Scores:
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)

    def accumulate(acc, grads, params):
        for k in range(probes):
            vs = [torch.randint(0, 2, p.shape, generator=gen, device=device).to(p.dtype).mul_(2).sub_(1)
                  for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=k < probes - 1)
            for a, v, h in zip(acc, vs, hv):
                a.add_((v * h).float(), alpha=1.0 / probes)
        return probes

    return _second_order_pass(model, loader, task, counters, show, "hessian (hutchinson)", accumulate)
