"""Models built by name: ``build_model("smallcnn", input_shape=(1, 28, 28), num_classes=10)``."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

from torch import nn

from .nets import MLP, CharLSTM, ResNet18, SmallCNN

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda input_shape, num_classes, **kw: MLP(input_shape, num_classes, **kw),
    "smallcnn": lambda input_shape, num_classes, **kw: SmallCNN(input_shape, num_classes, **kw),
    "resnet18": lambda input_shape, num_classes, **kw: ResNet18(input_shape, num_classes, **kw),
    "char_lstm": lambda input_shape, num_classes, **kw: CharLSTM(input_shape, num_classes, **kw),
    "ddpm-unet": lambda input_shape, num_classes, **kw: _ddpm_unet(input_shape, num_classes, **kw),
}


def _ddpm_unet(input_shape, num_classes, **kw) -> nn.Module:
    """A class-conditional diffusion UNet (excise.diffusion; needs diffusers)."""
    from ..diffusion.unet import conditional_unet

    return conditional_unet(input_shape, num_classes, **kw)


def model_names():
    return sorted(_REGISTRY)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Build an architecture by name. ``resnet18`` takes ``width`` (64 by default; 16 for CPU work);
    ``char_lstm`` takes the vocabulary size as ``num_classes``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; known: {model_names()}")
    return _REGISTRY[name](tuple(input_shape), int(num_classes), **kwargs)


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add an architecture: ``factory(input_shape, num_classes, **kwargs) -> nn.Module``."""
    _REGISTRY[name] = factory


__all__ = ["build_model", "register_model", "model_names", "MLP", "SmallCNN", "ResNet18", "CharLSTM"]
