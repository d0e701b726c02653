"""Diagonal curvature of the training loss at the trained weights (SAPS selects the largest entries).

The target is the diagonal of the Hessian of the mean loss over the loader's samples,
H = (1/N) Σ_i ∇²θ ℓ_i, computed in eval mode. Estimators:

* ``exact``      — one double-backward per parameter entry (tiny models; the test oracle);
* ``hutchinson`` — E[v ⊙ Hv] with Rademacher probes v (Hessian-vector products);
* ``ggn_exact``  — the generalised Gauss–Newton diagonal, Σ_c p_c(x)·(∇θ ℓ(x, c))² per sample (one
                   per-sample backward per output class);
* ``ggn_mc``     — the same with labels drawn from the model's predictive distribution (``mc_samples`` per
                   input): unbiased for the GGN diagonal; with one sample it runs the module-local per-sample
                   pass of :mod:`.per_sample` (about the cost of a per-sample Fisher pass), with more, vmap.

For softmax cross-entropy the GGN equals the Hessian when the network is linear in its parameters. For a
piecewise-linear (ReLU, max-pool, eval-mode BatchNorm) network each single weight enters the output linearly,
so the network's own second derivative along one coordinate vanishes and the GGN *diagonal* equals the Hessian
diagonal (measured: relative error 4·10⁻⁷, benchmarks/results/saps.md); for an LSTM it does not (≈ 97 %),
though the largest entries largely coincide.

``backend="backpack"`` computes ``ggn_exact`` / ``ggn_mc`` with BackPACK
(``pip install --no-deps backpack-for-pytorch unfoldNd einops``), 5× faster than the torch.func path for
``ggn_exact`` on the SmallCNN (not for one-sample ``ggn_mc``); it supports ``nn.Sequential``-style models built from
the layers BackPACK knows (converted with ``use_converter=True``) and classification losses only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..tasks import Task, get_task, model_device
from ..types import Counters, Scores
from .common import batches, eval_mode, squared_sample_grads, summed, trainable

ESTIMATORS = ("exact", "hutchinson", "ggn_exact", "ggn_mc")
BACKENDS = ("torch", "backpack")


def hessian_diag(model: nn.Module, loader, task: Optional[Task] = None, method: str = "ggn_mc", probes: int = 10,
                 mc_samples: int = 1, seed: int = 0, counters: Optional[Counters] = None,
                 progress_bar: bool = False, chunk_size: int = 64, backend: str = "torch") -> Scores:
    """Diagonal of the loss curvature for every parameter that requires grad (see the module docstring)."""
    task = get_task(task)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "backpack":
        if method not in ("ggn_exact", "ggn_mc"):
            raise ValueError(f"backend='backpack' computes ggn_exact and ggn_mc, not {method!r}")
        return _backpack(model, loader, task, method, mc_samples, seed, counters, progress_bar)
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
        if mc_samples == 1:  # one sampled label per input: the per-sample squared gradients of the module-local
            # pass (as fast as the empirical Fisher's), with the targets drawn from each part's output
            from .per_sample import module_local_sums

            draw = torch.Generator(device=model_device(model)).manual_seed(seed)

            def sampled_losses(out, batch):
                return task.loss_from_output(out, task.sample_targets(out.detach(), draw), reduction="none")

            fast = module_local_sums(model, loader, task, sampled_losses, counters, progress_bar, "ggn (monte carlo)")
            if fast is not None:
                return fast
        gen = torch.Generator(device=model_device(model)).manual_seed(seed)

        def sampled(x, y, out):
            w = torch.full((out.shape[0],), 1.0 / mc_samples, device=out.device)
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
        for batch in batches(loader, show, desc):
            batch = task.to(batch, device)
            n = task.batch_size(batch)
            grads = torch.autograd.grad(task.loss(model, batch) * n, params, create_graph=True)
            backward = accumulate(acc, grads, params)
            total += n
            if counters is not None:
                counters.forward_passes += 1
                counters.backward_passes += backward
                counters.samples_seen += n
    total, = summed(acc, total)
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


def _backpack(model, loader, task, method, mc_samples, seed, counters, show) -> Scores:
    """BackPACK's DiagGGNExact / DiagGGNMC on a deep copy of the model (BackPACK hooks the modules it extends;
    the caller's model is left untouched), summed over batches with a summed loss and divided by N."""
    import copy
    import warnings

    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC
    except ImportError:
        raise ImportError("backend='backpack' needs BackPACK: "
                          "pip install --no-deps backpack-for-pytorch unfoldNd einops") from None
    if task.name != "classification":
        raise ValueError("backend='backpack' supports classification tasks only; use backend='torch'")
    ext, attr = (DiagGGNExact(), "diag_ggn_exact") if method == "ggn_exact" else \
        (DiagGGNMC(mc_samples=mc_samples), "diag_ggn_mc")
    device = model_device(model)
    torch.manual_seed(seed)  # DiagGGNMC draws its labels from torch's global generator
    copy_ = extend(copy.deepcopy(model).eval(), use_converter=True)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in copy_.parameters() if p.requires_grad]
    if len(params) != len(names):
        raise ValueError("BackPACK's converter changed the model's parameters; use backend='torch'")
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    total = 0
    for batch in batches(loader, show, f"{method} (backpack)"):
        batch = task.to(batch, device)
        x, y = task.inputs(batch), task.targets(batch)
        copy_.zero_grad()
        try:
            with backpack(ext), warnings.catch_warnings():
                # inputs never require grad here; torch warns about that for every hooked module
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss_fn(task.read_output(copy_(x)), y).backward()
        except NotImplementedError as e:
            raise ValueError(f"BackPACK does not support this model ({e}); use backend='torch'") from None
        for a, p in zip(acc, params):
            a.add_(getattr(p, attr).float())
        size = int(task.batch_size(batch))
        total += size
        if counters is not None:
            counters.forward_passes += 1
            counters.backward_passes += 1
            counters.samples_seen += size
    total, = summed(acc, total)
    if total == 0:
        raise ValueError(f"{method}: the loader yielded no sample")
    return Scores({n: a.div_(total) for n, a in zip(names, acc)})
