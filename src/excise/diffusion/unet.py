"""A class-conditional UNet behind excise's one-input model convention, and guided DDIM sampling."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class ConditionalUNet(nn.Module):
    """``forward((x_t, t, y)) -> ε̂``: diffusers' UNet2DModel with class embeddings; ``y = num_classes`` is the
    null (unconditional) class of classifier-free guidance. ``scheduler`` holds the DDPM noise schedule the
    model is trained with (its config: ``num_train_timesteps``, ``beta_schedule``)."""

    def __init__(self, unet: nn.Module, num_classes: int, num_train_timesteps: int = 1000,
                 beta_schedule: str = "linear"):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes
        self.schedule = {"num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule}

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, inputs):
        x_t, t, y = inputs
        return self.unet(x_t, t, class_labels=y).sample

    def scheduler(self, kind: str = "ddpm"):
        from diffusers import DDIMScheduler, DDPMScheduler

        return (DDPMScheduler if kind == "ddpm" else DDIMScheduler)(**self.schedule)


def conditional_unet(input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64, 64),
                     layers_per_block: int = 1, attention: bool = False, groups: int = 8,
                     num_train_timesteps: int = 1000) -> ConditionalUNet:
    """A small UNet2DModel for ``input_shape`` (C, H, W; H and W divisible by 2^(len(channels) − 1)) with
    ``num_classes`` + 1 class embeddings (the last: the null class), self-attention in the lowest block when
    ``attention``."""
    from diffusers import UNet2DModel

    c, h, w = input_shape
    if h != w or h % (2 ** (len(channels) - 1)):
        raise ValueError(f"conditional_unet needs square images divisible by {2 ** (len(channels) - 1)}, "
                         f"got {h}×{w} (pad them, e.g. 28 → 32)")
    down = ["DownBlock2D"] * len(channels)
    if attention:
        down[-1] = "AttnDownBlock2D"
    up = [{"DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}[b] for b in reversed(down)]
    unet = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, layers_per_block=layers_per_block,
                       block_out_channels=tuple(channels), down_block_types=tuple(down), up_block_types=tuple(up),
                       num_class_embeds=num_classes + 1, norm_num_groups=groups)
    return ConditionalUNet(unet, num_classes, num_train_timesteps)


@torch.no_grad()
def sample(model: ConditionalUNet, classes: Sequence[int], n_per_class: int, steps: int = 50,
           guidance: float = 2.0, seed: int = 0, shape: Optional[Sequence[int]] = None,
           batch_size: int = 256) -> tuple:
    """``(images, labels)``: ``n_per_class`` images of each class in ``classes`` by DDIM in ``steps`` steps with
    classifier-free guidance ε̂ = ε̂(∅) + w·(ε̂(y) − ε̂(∅)), ``w = guidance`` (1: conditional only). Seeded: the
    same call gives the same images. Images in the model's data range (clipped to [−1, 1])."""
    from ..tasks import model_device

    device = model_device(model)
    shape = tuple(shape) if shape is not None else (model.unet.config.in_channels, model.unet.config.sample_size,
                                                    model.unet.config.sample_size)
    labels = torch.tensor([c for c in classes for _ in range(n_per_class)], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), *shape), generator=gen)
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(labels), batch_size):
        sched = model.scheduler("ddim")
        sched.set_timesteps(steps)
        x = noise[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device)
        null = torch.full_like(y, model.null_class)
        for t in sched.timesteps:
            tt = torch.full((len(y),), int(t), device=device, dtype=torch.long)
            eps = model((torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])))
            cond, uncond = eps.chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    model.train(was)
    return torch.cat(out), labels
