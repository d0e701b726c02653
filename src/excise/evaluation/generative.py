"""Scores of what a class-conditional generator produces (pure functions of samples, labels and features).

The retrain oracle's numbers are the targets: forgetting = the forgotten class's samples are no longer
recognised as that class (the oracle's share); retained quality = the other classes' samples are recognised
and their feature statistics stay close to the original's. The features are a classifier's (its penultimate
layer): a Fréchet distance there is *not* Inception-FID and is comparable only between models scored with the
same classifier.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn


def recognised_share(predicted: torch.Tensor, conditioned: torch.Tensor,
                     classes: Optional[Sequence[int]] = None) -> Dict[int, float]:
    """``{c: % of the samples generated for class c that the classifier calls c}`` for each class in
    ``classes`` (default: every conditioned class)."""
    predicted, conditioned = torch.as_tensor(predicted).reshape(-1), torch.as_tensor(conditioned).reshape(-1)
    if predicted.shape != conditioned.shape:
        raise ValueError(f"{len(predicted)} predictions for {len(conditioned)} samples")
    out = {}
    for c in (sorted(int(v) for v in conditioned.unique()) if classes is None else classes):
        sel = conditioned == c
        if not bool(sel.any()):
            raise ValueError(f"no sample was generated for class {c}")
        out[int(c)] = 100.0 * float((predicted[sel] == c).float().mean())
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between Gaussians fitted to the rows of ``a`` and ``b``
    (n × d features; unbiased covariances)."""
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two n × d arrays with n ≥ 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def kernel_distance(a: np.ndarray, b: np.ndarray, degree: int = 3) -> float:
    """Unbiased MMD² with the polynomial kernel k(x, y) = (xᵀy / d + 1)^degree (KID's statistic, here in the
    given feature space). 0 in expectation for samples of one distribution."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    m, n, d = len(a), len(b), a.shape[1]
    if m < 2 or n < 2:
        raise ValueError("kernel_distance needs at least two samples on each side")
    kaa, kbb, kab = ((x @ y.T / d + 1) ** degree for x, y in ((a, a), (b, b), (a, b)))
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2 * kab.mean())


@torch.no_grad()
def classifier_outputs(classifier: nn.Module, images: torch.Tensor, batch_size: int = 512):
    """``(class probabilities, penultimate features)`` of ``classifier`` on ``images``: the features are the
    input of its last ``nn.Linear`` (what a classifier's head reads)."""
    from ..tasks import model_device

    heads = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError("classifier_outputs needs a classifier whose last layer is an nn.Linear")
    feats = []
    hook = heads[-1].register_forward_hook(lambda m, args, out: feats.append(args[0].flatten(1).detach().cpu()))
    was = classifier.training
    classifier.eval()
    preds = []
    try:
        device = model_device(classifier)
        for i in range(0, len(images), batch_size):
            preds.append(torch.softmax(classifier(images[i:i + batch_size].to(device)).float(), -1).cpu())
    finally:
        hook.remove()
        classifier.train(was)
    return torch.cat(preds), torch.cat(feats).numpy()
