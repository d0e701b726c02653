"""Agreement between a model and the retrain oracle on the same samples."""

from __future__ import annotations

import torch


def prediction_agreement(p_model: torch.Tensor, p_oracle: torch.Tensor) -> float:
    """% of samples on which both models predict the same class. Higher is closer; ideal 100."""
    _same(p_model, p_oracle)
    return 100.0 * float((p_model.argmax(-1) == p_oracle.argmax(-1)).float().mean())


def kl_divergence(p_ref: torch.Tensor, p: torch.Tensor) -> float:
    """Mean KL(p_ref ‖ p) over samples (nats). Lower is closer; ideal 0."""
    _same(p_ref, p)
    a, b = p_ref.double().clamp_min(1e-12), p.double().clamp_min(1e-12)
    return float((a * (a.log() - b.log())).sum(-1).mean())


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean Jensen–Shannon divergence over samples (nats, ≤ ln 2). Lower is closer; ideal 0."""
    _same(p, q)
    m = 0.5 * (p.double() + q.double())
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def _same(a, b):
    if a.shape != b.shape:
        raise ValueError(f"probability matrices differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
