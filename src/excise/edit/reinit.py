"""Re-initialisation (Scissorhands' trim): selected entries get a fresh draw of their layer's own initialiser."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..types import Mask


def reinit(model: nn.Module, mask: Mask, seed: int = 0, inplace: bool = False, zero_bias: bool = True) -> nn.Module:
    """Replace the selected entries by a fresh initialisation and return the model (a copy unless ``inplace``).

    For each module owning a selected parameter, a copy of the module is re-initialised with its own
    ``reset_parameters()`` (PyTorch's default for Conv/Linear) under ``seed``, and the selected entries are
    taken from it. Biases are set to zero when ``zero_bias``. Entries outside the mask stay bit-identical.
    """
    target = model if inplace else copy.deepcopy(model)
    owners = {}
    for mod_name, module in target.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{pname}" if mod_name else pname] = (module, pname)
    unknown = set(mask) - set(owners)
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
                module, pname = owners[name]
                param = getattr(module, pname)
                if zero_bias and pname == "bias":
                    fresh = torch.zeros_like(param)
                else:
                    if id(module) not in fresh_modules:
                        if not hasattr(module, "reset_parameters"):
                            raise ValueError(f"{type(module).__name__} (owning {name}) has no reset_parameters(); "
                                             "leave it out of the scope")
                        clone = copy.deepcopy(module).to("cpu")
                        clone.reset_parameters()
                        fresh_modules[id(module)] = clone
                    fresh = getattr(fresh_modules[id(module)], pname).to(param.device, param.dtype)
                sel = m.to(param.device)
                param[sel] = fresh[sel]
    finally:
        torch.random.set_rng_state(gen_state)
    return target
