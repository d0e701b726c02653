"""Curvature-vector products of the mean loss over a loader: the Hessian's (double backward) and the
generalised Gauss–Newton's (Jᵀ H_out J v, forward- and reverse-mode). SAPS's Newton step solves with them."""

from __future__ import annotations

import torch

from ..tasks import model_device
from .common import batches, eval_mode, summed, trainable


def hvp(model, loader, task, vec, counters=None):
    """Hessian-vector product of the mean loss over the loader's samples; ``vec`` a list shaped like the
    trainable parameters."""
    named = trainable(model)
    params = [p for _, p in named]
    out = [torch.zeros_like(p) for p in params]
    device, total = model_device(model), 0
    with eval_mode(model):
        for batch in batches(loader, False, "curvature-vector product"):
            batch = task.to(batch, device)
            n = task.batch_size(batch)
            grads = torch.autograd.grad(task.loss(model, batch) * n, params, create_graph=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=vec)
            for o, h in zip(out, hv):
                o.add_(h)
            total += n
            if counters is not None:
                counters.forward_passes += 1
                counters.backward_passes += 2
                counters.samples_seen += n
    total, = summed(out, total)
    return [o / total for o in out]


def ggn_vp(model, loader, task, vec, counters=None):
    """Generalised Gauss–Newton-vector product Jᵀ H_out J v of the mean loss over the loader's samples
    (positive semi-definite, so conjugate gradients are safe); ``vec`` shaped like the trainable parameters."""
    from torch.func import functional_call, jvp, vjp

    named = trainable(model)
    params = {n: p.detach() for n, p in named}
    tangent = {n: v.detach() for (n, _), v in zip(named, vec)}
    rest = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    rest.update({n: b.detach() for n, b in model.named_buffers()})
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    device, total = model_device(model), 0
    with eval_mode(model):
        for batch in batches(loader, False, "curvature-vector product"):
            batch = task.to(batch, device)
            x = task.inputs(batch)

            def f(p):
                return task.read_output(functional_call(model, {**p, **rest}, (x,)))

            logits, pullback = vjp(f, params)
            try:
                _, ju = jvp(f, (params,), (tangent,))
            except NotImplementedError:  # no forward-mode AD for this layer (e.g. CPU LSTM): use double-vjp
                ju = _jvp_by_double_vjp(f, params, tangent, logits)
            (gv,) = pullback(task.output_hessian_vp(logits.detach(), ju.detach()))
            for n in out:
                out[n].add_(gv[n])
            total += task.batch_size(batch)
            if counters is not None:
                counters.forward_passes += 1
                counters.backward_passes += 1
                counters.samples_seen += task.batch_size(batch)
    total, = summed(out.values(), total)
    return [out[n] / total for n, _ in named]


def _jvp_by_double_vjp(f, params, tangent, like):
    """J·v from two reverse passes: with u a dummy cotangent, Jᵀu is linear in u, and ∂(⟨Jᵀu, v⟩)/∂u = J·v."""
    primals = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    out = f(primals)
    u = torch.zeros_like(like, requires_grad=True)
    grads = torch.autograd.grad(out, list(primals.values()), grad_outputs=u, create_graph=True)
    dot = sum((g * tangent[n]).sum() for n, g in zip(primals, grads))
    (ju,) = torch.autograd.grad(dot, u)
    return ju
