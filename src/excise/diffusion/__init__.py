"""Generative unlearning: class-conditional diffusion models (diffusers' UNet2DModel and DDPM/DDIM schedulers).

- :class:`DiffusionTask`: the ε-prediction loss ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, y)‖² of (image, class)
  batches, its timestep and noise drawn per sample from the sample's own content and a seed, so a pass over the
  same data gives the same losses whatever the loader's batches and order (importance is reproducible);
- :func:`conditional_unet` / :class:`ConditionalUNet`: a UNet2DModel with class embeddings and a null class
  (index ``num_classes``) for classifier-free guidance, behind a one-argument ``forward((x_t, t, y))`` so that
  excise's importance, selection and edits run on it unchanged;
- :func:`sample`: DDIM sampling with classifier-free guidance, seeded.

diffusers is imported on first use (``pip install diffusers``).
"""

from .task import DiffusionTask
from .unet import ConditionalUNet, conditional_unet, sample

__all__ = ["DiffusionTask", "ConditionalUNet", "conditional_unet", "sample"]
