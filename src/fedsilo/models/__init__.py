"""Model zoo, by name.  Every model is DP-ready in spirit: no BatchNorm (GroupNorm instead)."""

from __future__ import annotations

from fedsilo.models import dp_cnn as _dp_cnn  # noqa: F401  (registers)
from fedsilo.models import resnet as _resnet  # noqa: F401  (registers)
from fedsilo.models import small_cnn as _small_cnn  # noqa: F401  (registers)
from fedsilo.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
