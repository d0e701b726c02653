"""Gradient projection: keep the update from re-learning the forget set (Scissorhands' repair, after GEM).

Given a step direction g and memory directions g_1..g_t (rows of G; here gradients of −L_f, i.e. directions
that keep forgetting), find g̃ close to g whose inner products with the memories are not negative. The dual
of min ½‖g̃ − g‖² s.t. G g̃ ≥ 0 is

    min_v ½ vᵀ (G Gᵀ + εI) v + (G g)ᵀ v   s.t. v ≥ margin,      g̃ = g + Gᵀ v,

applied only when some ⟨g, g_i⟩ < 0. With one memory it has the closed form
v = max(margin, −⟨g, g_o⟩ / (‖g_o‖² + ε)). Everything stays in torch, on the gradients' device.
"""

from __future__ import annotations

from typing import Sequence

import torch

EPS = 1e-3


def project_one(g: torch.Tensor, g_o: torch.Tensor, margin: float = 0.5, eps: float = EPS) -> torch.Tensor:
    """Closed-form one-memory projection. Returns g unchanged when ⟨g, g_o⟩ ≥ 0."""
    dot = torch.dot(g, g_o)
    if dot >= 0:
        return g
    v = torch.clamp(-dot / (torch.dot(g_o, g_o) + eps), min=margin)
    return g + v * g_o


def solve_dual_qp(P: torch.Tensor, q: torch.Tensor, lower: float, iters: int = 2000, tol: float = 1e-10) -> torch.Tensor:
    """min_v ½ vᵀ P v + qᵀ v  s.t. v ≥ lower, for a small symmetric positive-definite P (t × t), by exact
    coordinate minimisation (converges for PD P)."""
    t = P.shape[0]
    v = torch.full((t,), float(lower), dtype=P.dtype, device=P.device)
    diag = torch.diagonal(P)
    for _ in range(iters):
        change = 0.0
        for i in range(t):
            r = q[i] + torch.dot(P[i], v) - P[i, i] * v[i]
            new = torch.clamp(-r / diag[i], min=lower)
            change = max(change, float((new - v[i]).abs()))
            v[i] = new
        if change < tol:
            break
    return v


def project(g: torch.Tensor, memories: torch.Tensor, margin: float = 0.5, eps: float = EPS) -> torch.Tensor:
    """Project ``g`` (flat) against the rows of ``memories`` (t × n). No change when no constraint is violated."""
    if memories.dim() == 1:
        memories = memories.unsqueeze(0)
    dots = memories @ g
    if (dots >= 0).all():
        return g
    if memories.shape[0] == 1:
        return project_one(g, memories[0], margin, eps)
    G = memories.double()
    P = G @ G.T
    P = 0.5 * (P + P.T) + eps * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    v = solve_dual_qp(P, G @ g.double(), margin)
    return (g.double() + G.T @ v).to(g.dtype)


def flat_grad(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def write_flat_grad(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        chunk = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n
