"""Model zoo, by name.  Every model is DP-ready in spirit: no BatchNorm (GroupNorm instead)."""

from __future__ import annotations

from typing import Any

from fedsilo.models import dp_cnn as _dp_cnn  # noqa: F401  (registers)
from fedsilo.models import small_cnn as _small_cnn  # noqa: F401  (registers)
from fedsilo.models.registry import MODELS, build_model


@MODELS.register("resnet18")
def _resnet18(**kwargs: Any) -> Any:
    """ResNet-18 (``models/resnet.py``): torchvision is imported only by runs that use it."""
    from fedsilo.models.resnet import resnet18

    return resnet18(**kwargs)


__all__ = ["MODELS", "build_model"]
