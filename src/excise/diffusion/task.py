"""The diffusion loss as an excise Task."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..tasks import Task


class DiffusionTask(Task):
    """ε-prediction: batches are ``(x₀, y)`` (images in the model's data range, class labels); the loss of a
    sample is ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, y)‖² (mean over pixels), with t uniform on the schedule's
    timesteps and ε standard normal, both drawn from a generator seeded by ``seed``, the sample's own bytes and
    a fingerprint of the model's current weights: at fixed weights (an importance pass) the same sample gets the
    same (t, ε) whatever the batching and order, so importance and per-sample losses are reproducible; while a
    method trains, every step's weights differ, so every step draws afresh — and a seeded run repeats exactly. ``cond_drop`` (training only): the share of samples whose
    label is replaced by the null class (classifier-free guidance). ``output`` returns ε̂ and ε stacked
    (N, 2, C, H, W), which ``loss_from_output`` compares."""

    name = "diffusion"

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear", seed: int = 0,
                 null_class: int = -1, cond_drop: float = 0.0):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
        self.timesteps = num_train_timesteps
        self.seed, self.null_class, self.cond_drop = seed, null_class, cond_drop

    def inputs(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def targets(self, batch: Any) -> torch.Tensor:
        return batch[1]

    def draws(self, x0: torch.Tensor, salt: bytes = b""):
        """``(t, ε, drop)`` per sample, from ``seed``, ``salt`` and each sample's bytes (``drop``: replace its
        label by the null class, with probability ``cond_drop``)."""
        ts, eps, drop = [], [], []
        key = str(self.seed).encode() + salt
        for xi in x0.detach().cpu().contiguous():
            h = hashlib.blake2b(xi.numpy().tobytes() + key, digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(h, "little") & (2 ** 63 - 1))
            ts.append(int(torch.randint(0, self.timesteps, (1,), generator=g)))
            eps.append(torch.randn(xi.shape, generator=g))
            drop.append(bool(torch.rand(1, generator=g) < self.cond_drop))
        device = x0.device
        return (torch.tensor(ts, device=device), torch.stack(eps).to(device, x0.dtype),
                torch.tensor(drop, device=device))

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x0, y = batch[0], batch[1]
        t, eps, drop = self.draws(x0, weights_salt(model))
        if self.cond_drop and self.null_class >= 0:
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        x_t = self.scheduler.add_noise(x0, eps, t)
        return torch.stack([model((x_t, t, y)), eps], 1)

    def random_label_loss(self, model: nn.Module, forget: Any, generator: torch.Generator,
                          other: Any = None) -> torch.Tensor:
        """SalUn's random-label forgetting for a conditional generator: condition on the forget batch's classes
        and learn to denoise the *other* data's images (``other``: a batch of the retain set), so that the
        forgotten class's condition leads elsewhere."""
        if other is None:
            raise ValueError("random-label forgetting on a diffusion task needs a batch of the retain set")
        x_r = other[0]
        y_f = forget[1]
        pick = torch.randint(0, len(y_f), (len(x_r),), generator=generator).to(y_f.device)
        return self.loss(model, (x_r, y_f[pick]))

    def loss_from_output(self, output: torch.Tensor, targets: Any = None, reduction: str = "mean") -> torch.Tensor:
        per = (output[:, 0] - output[:, 1]).pow(2).flatten(1).mean(1)
        if reduction == "none":
            return per
        return per.sum() if reduction == "sum" else per.mean()


def weights_salt(model: nn.Module, tensors: int = 8, entries: int = 16) -> bytes:
    """A few bytes that change whenever the model's weights do: the first ``entries`` values of its first
    ``tensors`` parameters."""
    parts = [p.detach().reshape(-1)[:entries].float().cpu() for p in list(model.parameters())[:tensors]]
    return torch.cat(parts).numpy().tobytes() if parts else b""
