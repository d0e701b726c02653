"""Exposure of a canary (Carlini et al., "The Secret Sharer", USENIX Security 2019).

exposure = log2 |R| − log2 rank(canary), where candidates of the randomness space R are ranked by
log-perplexity under the model (rank 1 = the most likely). Enumerated exactly when R is small; otherwise
estimated from sampled candidates with a fitted skew-normal: exposure ≈ −log2 P(candidate ≤ canary).
Direction: lower = less memorised; ideal = the retrain oracle's value (≈ 0–2 for an unseen secret).
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Sequence

import numpy as np
import torch
from torch import nn

from ..importance.common import eval_mode
from ..tasks import model_device


def exposure_exact(candidate_scores: Sequence[float], canary_score: float) -> float:
    """Exposure from the log-perplexities of every candidate in R (the canary among them)."""
    scores = np.asarray(candidate_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no candidates")
    rank = 1 + int((scores < canary_score).sum())
    return math.log2(scores.size) - math.log2(rank)


def exposure_skewnorm(sample_scores: Sequence[float], canary_score: float) -> float:
    """Exposure estimated from sampled candidates: fit a skew-normal to their log-perplexities and return
    −log2 CDF(canary's log-perplexity)."""
    from scipy.stats import skewnorm

    scores = np.asarray(sample_scores, dtype=np.float64)
    if scores.size < 10:
        raise ValueError("sample at least 10 candidates to fit the distribution")
    a, loc, scale = skewnorm.fit(scores)
    cdf = float(skewnorm.cdf(canary_score, a, loc, scale))
    return -math.log2(max(cdf, 1e-300))


@torch.no_grad()
def log_perplexity(model: nn.Module, vocab, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
    """Σ_t −log p(x_t | x_<t) over every character after the first, for each text (all the same length)."""
    device = model_device(model)
    ids = torch.stack([vocab.encode(t) for t in texts])
    out = []
    with eval_mode(model):
        for s in range(0, len(ids), batch_size):
            chunk = ids[s:s + batch_size].to(device)
            logits = model(chunk[:, :-1]).float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
            out.append(nll.sum(1).cpu())
    return torch.cat(out).double().numpy()


def canary_exposure(model: nn.Module, vocab, prefix: str, secret: str, alphabet: str = "0123456789",
                    exact_limit: int = 100_000, samples: int = 5_000, seed: int = 0) -> Dict[str, float]:
    """Exposure of ``prefix + secret`` among all secrets of the same length over ``alphabet``.

    Returns ``{"exposure", "method" ("exact" | "skewnorm"), "candidates", "log_perplexity"}``.
    """
    if any(c not in alphabet for c in secret):
        raise ValueError("the secret must be drawn from the alphabet")
    space = len(alphabet) ** len(secret)
    canary_score = float(log_perplexity(model, vocab, [prefix + secret])[0])
    if space <= exact_limit:
        cands = [prefix + "".join(p) for p in itertools.product(alphabet, repeat=len(secret))]
        scores = log_perplexity(model, vocab, cands)
        return {"exposure": exposure_exact(scores, canary_score), "method": "exact", "candidates": space,
                "log_perplexity": canary_score}
    rng = np.random.default_rng(seed)
    cands = [prefix + "".join(rng.choice(list(alphabet), len(secret))) for _ in range(samples)]
    scores = log_perplexity(model, vocab, cands)
    return {"exposure": exposure_skewnorm(scores, canary_score), "method": "skewnorm", "candidates": samples,
            "log_perplexity": canary_score}


def perplexity(model: nn.Module, loader, task=None) -> float:
    """Per-character perplexity exp(mean NLL) over every window of a language-model loader."""
    from ..tasks import LanguageModelTask

    task = task or LanguageModelTask()
    device = model_device(model)
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in loader:
            batch = task.to(batch, device)
            n = task.batch_size(batch)
            total += float(task.loss(model, batch)) * n
            count += n
    if count == 0:
        raise ValueError("the loader yielded no batch")
    return math.exp(total / count)
