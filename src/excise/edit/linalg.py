"""Small linear-algebra helpers that stay on the device: conjugate gradients on flat vectors."""

from __future__ import annotations

from typing import Callable

import torch


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 50,
                       tol: float = 1e-6) -> tuple:
    """Solve A x = b for symmetric positive-definite A given only ``matvec(v) = A v``.

    Returns ``(x, iterations, relative residual)``; stops when ‖r‖ ≤ tol·‖b‖.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    b_norm = torch.sqrt(torch.dot(b, b)).clamp_min(1e-30)
    it = 0
    for it in range(1, iters + 1):
        ap = matvec(p)
        denom = torch.dot(p, ap)
        if denom <= 0:
            raise ValueError("conjugate gradients met a direction of non-positive curvature: "
                             "increase the damping δ")
        alpha = rs / denom
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.dot(r, r)
        if torch.sqrt(rs_new) <= tol * b_norm:
            rs = rs_new
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, it, float(torch.sqrt(rs) / b_norm)
