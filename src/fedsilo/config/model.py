"""The ``model`` section (docs/models.md): a zoo name, or ``tv:ARCH`` for any torchvision
classification model, checked by name without importing a model (or torch)."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic.dataclasses import dataclass

from fedsilo.config.plugins import MODELS
from fedsilo.config.schema import SECTION_CONFIG, Int, Str, bool_words, check, setting

#: the prefix of torchvision model names (``tv:resnet50``)
TORCHVISION = "tv:"


def names_torchvision_weights(weights: str) -> bool:
    """Whether ``model.weights`` names torchvision weights (``DEFAULT``, ``IMAGENET1K_V2``)
    rather than a file: upper-case letters, digits and ``_``, and no such file exists.

    >>> names_torchvision_weights("IMAGENET1K_V2"), names_torchvision_weights("w/resnet.pth")
    (True, False)
    """
    return weights.replace("_", "").isalnum() and weights.upper() == weights \
        and not os.path.exists(weights)


@dataclass(frozen=True, config=SECTION_CONFIG)
class ModelConfig:
    """The model (docs/models.md): a zoo name, or ``tv:ARCH`` for any torchvision
    classification model, adapted to the shards' channels, classes and image size."""

    #: small_cnn, dp_cnn, resnet18, or tv:ARCH (tv:resnet50, tv:densenet121, tv:vit_b_16...)
    name: Str = "small_cnn"
    #: groups of GroupNorm layers (ResNet); channels must be divisible by it.  The DP fix
    #: gives a BatchNorm of C channels gcd(norm_groups, C) groups
    norm_groups: Int = setting(32, ge=1)
    #: initial weights: a state_dict file (torch.load(weights_only=True)), or for tv: models
    #: torchvision's weights name (DEFAULT, IMAGENET1K_V1...; torch hub's cache); null: random
    weights: Str | None = None
    #: tv: models: first layers for the image size: auto (small-image stem up to 64 px),
    #: small, imagenet (torchvision's stem as is)
    stem: Literal["auto", "small", "imagenet"] = "auto"
    #: make the model DP-SGD-ready (BatchNorm -> GroupNorm, no in-place ops, as Opacus's
    #: ModuleValidator.fix): on, off, auto (on exactly when dp.enabled)
    dp_fix: Annotated[Literal["auto", "on", "off"], bool_words("on", "off")] = "auto"
    #: what trains (the rest stays frozen): all, head (the last Linear layer), or N (the
    #: last N blocks and the head)
    train_layers: Literal["all", "head"] | Int = "all"

    def __post_init__(self) -> None:
        if self.name.startswith(TORCHVISION):
            # read from torchvision's source: no rank imports torch to check a name
            from fedsilo.config.tvnames import check_name, check_weights

            arch = check_name(self.name)  # fails early with the known names
            if self.weights is not None and names_torchvision_weights(self.weights):
                check_weights(arch, self.weights)
        else:
            MODELS.get(self.name)  # fails early with the known names
            check(self.stem == "auto", "model.stem", "applies to tv: models only")
            check(self.weights is None or not names_torchvision_weights(self.weights),
                  "model.weights",
                  f"names torchvision weights ({self.weights}), which only tv: models have; "
                  f"give a .pth file for {self.name}")
        check(self.weights is None or bool(self.weights.strip()), "model.weights",
              "must be a file path, a torchvision weights name, or null")
        check(not isinstance(self.train_layers, int) or self.train_layers >= 1,
              "model.train_layers", "must be all, head, or a number of blocks >= 1")
