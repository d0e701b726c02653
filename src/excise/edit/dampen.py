"""Dampening (SSD): shrink selected weights in proportion to how much more the forget set needs them."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..types import Mask, Scores


def dampen(model: nn.Module, mask: Mask, i_f: Scores, i_ref: Scores, lam: float = 1.0,
           inplace: bool = False) -> nn.Module:
    """θ_i ← min(λ·I_ref,i / I_f,i, 1)·θ_i on the entries selected by ``mask``; others stay bit-identical.

    Returns a new model unless ``inplace=True``. An entry with I_f,i = 0 keeps its value (factor 1).
    """
    if lam < 0:
        raise ValueError(f"lambda must be non-negative, got {lam}")
    target = model if inplace else copy.deepcopy(model)
    params = dict(target.named_parameters())
    unknown = set(mask) - set(params)
    if unknown:
        raise ValueError(f"mask names parameters the model lacks: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for name, m in mask.items():
            if not m.any():
                continue
            p = params[name]
            f, r = i_f[name].to(p.device), i_ref[name].to(p.device)
            factor = torch.where(f > 0, (lam * r / f.clamp_min(torch.finfo(f.dtype).tiny)).clamp(max=1.0),
                                 torch.ones_like(f))
            sel = m.to(p.device)
            p[sel] = (p[sel] * factor[sel].to(p.dtype))
    return target
