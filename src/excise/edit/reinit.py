"""Re-initialisation (Scissorhands' trim): selected entries get a fresh draw of their layer's own initialiser."""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..types import Mask


def initialiser(module: nn.Module) -> Optional[Callable[[], None]]:
    """The module's own initialiser of its parameters: ``reset_parameters()`` (Linear, Conv, norms, Embedding, …)
    or ``_reset_parameters()`` (``nn.MultiheadAttention``'s, ``nn.Transformer``'s); None for a module that has
    neither (a user module owning a bare ``nn.Parameter``, e.g. a positional embedding)."""
    for name in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def owners(model: nn.Module) -> Dict[str, Tuple[nn.Module, str]]:
    """Full parameter name → (the module that owns it, its local name)."""
    out = {}
    for mod_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            out[f"{mod_name}.{pname}" if mod_name else pname] = (module, pname)
    return out


def initialise(model: nn.Module) -> List[str]:
    """Run every module's own initialiser (:func:`initialiser`); return the parameters none covered."""
    for module in model.modules():
        init = initialiser(module)
        if init is not None:
            init()
    return without_initialiser(model, [n for n, _ in model.named_parameters()])


def without_initialiser(model: nn.Module, names=None) -> List[str]:
    """The parameters (of ``names``, default every trainable one) whose owning module has no initialiser."""
    own = owners(model)
    if names is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n in names if n in own and initialiser(own[n][0]) is None]


def reinit(model: nn.Module, mask: Mask, seed: int = 0, inplace: bool = False, zero_bias: bool = True) -> nn.Module:
    """Replace the selected entries by a fresh initialisation and return the model (a copy unless ``inplace``).

    For each module owning a selected parameter, a copy of the module is re-initialised with its own
    initialiser (:func:`initialiser`: ``reset_parameters()``, PyTorch's default for Conv/Linear, or
    ``_reset_parameters()``) under ``seed``, and the selected entries are taken from it. Biases are set to zero
    when ``zero_bias``, and so are the selected entries of a parameter whose module has no initialiser (a bare
    ``nn.Parameter``: :func:`without_initialiser` names them). Entries outside the mask stay bit-identical.
    """
    target = model if inplace else copy.deepcopy(model)
    own = owners(target)
    unknown = set(mask) - set(own)
    if unknown:
        raise ValueError(f"mask names parameters the model lacks: {sorted(unknown)[:5]}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        fresh_modules = {}
        with torch.no_grad():
            for name, m in mask.items():
                if not m.any():
                    continue
                module, pname = own[name]
                param = getattr(module, pname)
                if zero_bias and pname == "bias" or initialiser(module) is None:
                    fresh = torch.zeros_like(param)
                else:
                    if id(module) not in fresh_modules:
                        clone = copy.deepcopy(module).to("cpu")
                        initialiser(clone)()
                        fresh_modules[id(module)] = clone
                    fresh = getattr(fresh_modules[id(module)], pname).to(param.device, param.dtype)
                sel = m.to(param.device)
                param[sel] = fresh[sel]
    finally:
        torch.random.set_rng_state(gen_state)
    return target
