"""Scoring a class-conditional generator through the metric registry: sample every class with a fixed seed,
let a classifier judge the samples, and compare their features with real images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..evaluation.generative import classifier_outputs
from ..evaluation.metrics import Predictions, applicable, compute
from .unet import ConditionalUNet, sample


def generation_predictions(model: ConditionalUNet, classifier: nn.Module, forgotten: Sequence[int],
                           classes: Sequence[int], real_retain: torch.Tensor, n_per_class: int = 100,
                           steps: int = 50, guidance: float = 2.0, seed: int = 0,
                           to_classifier: Optional[Callable] = None) -> tuple:
    """``(Predictions, images, labels)``: ``n_per_class`` guided DDIM samples of every class in ``classes``
    (seeded), the classifier's probabilities on them split into "generated_forget" (conditioned on a class of
    ``forgotten``) and "generated_retain", and the classifier's features of the latter and of ``real_retain``
    (real images of the other classes, in the classifier's input form) as "feat:generated_retain" and
    "feat:real_retain". ``to_classifier`` maps the generator's images to the classifier's input."""
    images, labels = sample(model, list(classes), n_per_class, steps=steps, guidance=guidance, seed=seed)
    shown = to_classifier(images) if to_classifier is not None else images
    probs, feats = classifier_outputs(classifier, shown)
    gone = torch.isin(labels, torch.tensor(list(forgotten), dtype=labels.dtype))
    preds = {}
    if bool(gone.any()):
        preds["generated_forget"] = (probs[gone], labels[gone])
    if bool((~gone).any()):
        preds["generated_retain"] = (probs[~gone], labels[~gone])
    _, real = classifier_outputs(classifier, real_retain)
    features = {"generated_retain": feats[(~gone).numpy()], "real_retain": real}
    return Predictions(preds, seed=seed, features=features), images, labels


def generation_metrics(*args, **kwargs) -> Dict[str, Any]:
    """The registered metrics that apply to :func:`generation_predictions`' splits (same arguments):
    forget_recognised, retain_recognised, fid_retain, kid_retain."""
    p, _, _ = generation_predictions(*args, **kwargs)
    return compute(p, applicable(p.splits()))


def sample_grid(images: torch.Tensor, rows: int, path: str | Path, title: str = "") -> Path:
    """A PNG of ``images`` (in [−1, 1]) in ``rows`` rows (one row a class when sampled class by class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(images) // rows
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.55, rows * 0.55 + (0.3 if title else 0)), squeeze=False)
    for ax, im in zip(axes.flat, images):
        ax.imshow(((im[0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    from ..evaluation.plots import save_figure

    path = save_figure(fig, path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
