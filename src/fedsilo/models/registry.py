"""The model registry; factories take the data's shape and the model config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from fedsilo.config.plugins import MODELS as _MODELS
from fedsilo.registry import Registry

if TYPE_CHECKING:
    import torch


class ModelFactory(Protocol):
    def __call__(self, *, in_channels: int, num_classes: int, image_size: tuple[int, int],
                 norm_groups: int) -> torch.nn.Module: ...


#: defined with the configuration, which checks names in it without importing this package
MODELS: Registry[Callable[..., object]] = _MODELS


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: tuple[int, int],
                norm_groups: int = 32):
    """Build model ``name`` for images of ``in_channels × image_size`` and ``num_classes``."""
    factory = MODELS.get(name)
    return factory(in_channels=in_channels, num_classes=num_classes, image_size=tuple(image_size),
                   norm_groups=norm_groups)
