"""Selection: turn Scores into a Mask.

Which parameters are eligible at all is a :class:`Scope`, chosen by module type or name pattern — never
by names hard-coded for one architecture.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch import nn

from .types import Mask, Scores

NORM_TYPES: Tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_TYPE_ALIASES = {
    "norm": NORM_TYPES,
    "linear": (nn.Linear,),
    "conv": (nn.modules.conv._ConvNd,),
    "embedding": (nn.Embedding,),
}


def _types(spec) -> Tuple[type, ...]:
    out: list = []
    for s in spec or ():
        if isinstance(s, str):
            if s not in _TYPE_ALIASES:
                raise ValueError(f"unknown module type alias {s!r}; known: {sorted(_TYPE_ALIASES)}")
            out.extend(_TYPE_ALIASES[s])
        elif isinstance(s, type) and issubclass(s, nn.Module):
            out.append(s)
        else:
            raise ValueError(f"scope types must be nn.Module subclasses or aliases, got {s!r}")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Scope:
    """Which parameters may be selected.

    include_types / exclude_types: module classes (or aliases ``norm``, ``linear``, ``conv``, ``embedding``)
    owning the parameter. include / exclude: regular expressions matched (``re.search``) against the
    parameter's full name. ``biases``: whether parameters named ``*.bias`` are eligible.
    An empty scope (the default) makes every trainable parameter eligible.
    """

    include_types: Sequence = ()
    exclude_types: Sequence = ()
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    biases: bool = True

    @classmethod
    def parse(cls, text: Optional[str]) -> "Scope":
        """CLI form: ``all``, ``no-norm``, ``weights``, or ``pattern:REGEX``."""
        if text in (None, "", "all"):
            return cls()
        if text == "no-norm":
            return cls(exclude_types=("norm",))
        if text == "weights":
            return cls(exclude_types=("norm",), biases=False)
        if text.startswith("pattern:"):
            return cls(include=(text[len("pattern:"):],))
        raise ValueError(f"unknown scope {text!r}; expected all, no-norm, weights or pattern:REGEX")

    def names(self, model: nn.Module) -> Set[str]:
        inc_t, exc_t = _types(self.include_types), _types(self.exclude_types)
        inc = [re.compile(p) for p in self.include]
        exc = [re.compile(p) for p in self.exclude]
        out = set()
        for mod_name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{pname}" if mod_name else pname
                if not p.requires_grad:
                    continue
                if inc_t and not isinstance(module, inc_t):
                    continue
                if exc_t and isinstance(module, exc_t):
                    continue
                if inc and not any(r.search(full) for r in inc):
                    continue
                if any(r.search(full) for r in exc):
                    continue
                if not self.biases and pname == "bias":
                    continue
                out.add(full)
        if not out:
            raise ValueError(f"scope {self} leaves no eligible parameter in {type(model).__name__}")
        return out


def _eligible(scores: Scores, eligible: Optional[Iterable[str]]) -> Sequence[str]:
    if eligible is None:
        return list(scores)
    eligible = set(eligible)
    unknown = eligible - set(scores)
    if unknown:
        raise ValueError(f"eligible names missing from the scores: {sorted(unknown)[:5]}")
    return [n for n in scores if n in eligible]


def _check_same(a: Scores, b: Scores) -> None:
    if set(a) != set(b):
        raise ValueError(f"score maps cover different parameters: {sorted(set(a) ^ set(b))[:5]}")
    for n in a:
        if a[n].shape != b[n].shape:
            raise ValueError(f"shape mismatch for {n}: {tuple(a[n].shape)} vs {tuple(b[n].shape)}")


def ratio(i_f: Scores, i_ref: Scores, alpha: float, eligible: Optional[Iterable[str]] = None) -> Mask:
    """SSD selection: entries with I_f,i > α·I_ref,i (strict), among eligible parameters."""
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    _check_same(i_f, i_ref)
    names = _eligible(i_f, eligible)
    return Mask({n: i_f[n] > alpha * i_ref[n] for n in names})


def _percentile(values: torch.Tensor, p: float) -> float:
    if values.numel() == 0:
        raise ValueError("no finite values to take a percentile of")
    return float(np.percentile(values.detach().double().cpu().numpy(), p))


def ratio_percentile(i_f: Scores, i_ref: Scores, p: float, eligible: Optional[Iterable[str]] = None) -> float:
    """The p-th percentile (0–100) of the pooled finite ratios I_f / I_ref over eligible entries (ASSD's α).

    Entries with I_ref = 0 give an infinite or undefined ratio and are left out of the pool.
    """
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    _check_same(i_f, i_ref)
    pooled = []
    for n in _eligible(i_f, eligible):
        r = i_f[n].double() / i_ref[n].double()
        pooled.append(r[torch.isfinite(r)].flatten())
    return _percentile(torch.cat(pooled), p)


def percentile(scores: Scores, p: float, eligible: Optional[Iterable[str]] = None) -> Mask:
    """Entries whose score is strictly above the p-th percentile of the pooled eligible scores."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    names = _eligible(scores, eligible)
    thr = _percentile(torch.cat([scores[n].flatten() for n in names]), p)
    return Mask({n: scores[n] > thr for n in names})


def topk(scores: Scores, k: float, eligible: Optional[Iterable[str]] = None, per_tensor: bool = False,
         largest: bool = True) -> Mask:
    """The top ``k`` (a fraction in (0, 1]) of eligible entries by score, globally or within each tensor."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k is a fraction in (0, 1], got {k}")
    names = _eligible(scores, eligible)
    if per_tensor:
        out = {}
        for n in names:
            flat = scores[n].flatten()
            m = torch.zeros_like(flat, dtype=torch.bool)
            m[torch.topk(flat.float(), max(1, int(round(k * flat.numel()))), largest=largest).indices] = True
            out[n] = m.view_as(scores[n])
        return Mask(out)
    flat = torch.cat([scores[n].flatten().float() for n in names])
    sel = torch.zeros_like(flat, dtype=torch.bool)
    sel[torch.topk(flat, max(1, int(round(k * flat.numel()))), largest=largest).indices] = True
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = sel[offset:offset + size].view_as(scores[n])
        offset += size
    return Mask(out)


def random_mask(like: Scores, k: float, eligible: Optional[Iterable[str]] = None, seed: int = 0) -> Mask:
    """A seeded uniformly random k fraction of the eligible entries (the ablation baseline)."""
    gen = torch.Generator().manual_seed(seed)
    names = _eligible(like, eligible)
    return topk(Scores({n: torch.rand(like[n].shape, generator=gen) for n in names}), k)


def last_layer(model: nn.Module) -> Set[str]:
    """Names of the parameters of the last module (in registration order) that owns parameters — found from
    the model's structure, not from a layer name."""
    last = None
    for mod_name, module in model.named_modules():
        own = [f"{mod_name}.{p}" if mod_name else p for p, t in module.named_parameters(recurse=False) if t.requires_grad]
        if own:
            last = own
    if last is None:
        raise ValueError("the model has no trainable parameter")
    return set(last)
