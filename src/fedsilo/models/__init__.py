"""Model zoo, by name.  Every model of the zoo is DP-ready in spirit: no BatchNorm (GroupNorm
instead).  ``tv:ARCH`` names any torchvision classification model (``models/torchvision.py``),
made DP-ready on request (``model.dp_fix``); :func:`build_for` builds what a run trains."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fedsilo.config.model import TORCHVISION  # the prefix of torchvision names (tv:resnet50)
from fedsilo.models.registry import MODELS, build_model

if TYPE_CHECKING:
    from torch import nn

    from fedsilo.config import Config

log = logging.getLogger("fedsilo")


# The zoo registers by name here and imports each model's module (torch, torchvision) only
# when it is built: the configuration checks a model's name on rank 0 before the shards are
# checked, and that must not cost an import of torch (issue #16).


@MODELS.register("small_cnn")
def _small_cnn(**kwargs: Any) -> Any:
    """The 420,610-parameter CNN of Flower's PneumoniaMNIST task (``models/small_cnn.py``)."""
    from fedsilo.models.small_cnn import small_cnn

    return small_cnn(**kwargs)


@MODELS.register("dp_cnn")
def _dp_cnn(**kwargs: Any) -> Any:
    """The DP-SGD CNN (``models/dp_cnn.py``)."""
    from fedsilo.models.dp_cnn import dp_cnn

    return dp_cnn(**kwargs)


@MODELS.register("scatter_linear")
def _scatter_linear(**kwargs: Any) -> Any:
    """Kymatio's fixed ScatterNet features, GroupNorm, a linear head (Tramèr & Boneh 2021;
    ``models/scatternet.py``): for DP-SGD on small sites."""
    from fedsilo.models.scatternet import scatter_linear

    return scatter_linear(**kwargs)


@MODELS.register("scatter_cnn")
def _scatter_cnn(**kwargs: Any) -> Any:
    """Kymatio's fixed ScatterNet features, GroupNorm, a small tanh CNN
    (``models/scatternet.py``): for DP-SGD on small sites."""
    from fedsilo.models.scatternet import scatter_cnn

    return scatter_cnn(**kwargs)


@MODELS.register("unet")
def _unet(**kwargs: Any) -> Any:
    """MONAI's residual U-Net for segmentation (``models/unet.py``; transposed convolutions:
    not for DP-SGD)."""
    from fedsilo.models.unet import unet

    return unet(**kwargs)


@MODELS.register("basic_unet")
def _basic_unet(**kwargs: Any) -> Any:
    """MONAI's BasicUNet for segmentation, GroupNorm, ReLU and non-trainable upsampling
    (``models/unet.py``): every parametrized layer is a Conv2d or a GroupNorm."""
    from fedsilo.models.unet import basic_unet

    return basic_unet(**kwargs)


@MODELS.register("resnet18")
def _resnet18(**kwargs: Any) -> Any:
    """ResNet-18 (``models/resnet.py``): torchvision is imported only by runs that use it."""
    from fedsilo.models.resnet import resnet18

    return resnet18(**kwargs)


def wants_dp_fix(config: "Config") -> bool:
    """``model.dp_fix``: on, off, or auto (on exactly when DP-SGD is: ``dp.enabled``)."""
    return config.model.dp_fix == "on" or (config.model.dp_fix == "auto" and config.dp.enabled)


def build_for(config: "Config", *, in_channels: int, num_classes: int,
              image_size: tuple[int, int], weights: bool = True,
              dense: bool = False) -> "nn.Module":
    """The model a run with ``config`` trains, for ``in_channels × image_size`` images of
    ``num_classes`` classes (``dense``: per pixel, a segmentation model): built by name,
    pretrained weights loaded (``weights``: False to skip them, when a state dict is loaded
    next anyway), made DP-ready (``model.dp_fix``),
    frozen but for ``model.train_layers``, and tried on a zero image.  Raises
    :class:`~fedsilo.errors.ModelError` naming the cause on every rank alike.
    """
    from fedsilo.models import adapt

    cfg = config.model
    image_size = (int(image_size[0]), int(image_size[1]))
    file_weights = cfg.weights if weights else None
    pending: dict[str, Any] | None = None
    notes: list[str] = []
    if cfg.name.startswith(TORCHVISION):
        from fedsilo.models import torchvision as tv

        model, pending, notes = tv.build(
            cfg.name[len(TORCHVISION):], in_channels=in_channels, num_classes=num_classes,
            image_size=image_size, weights=file_weights, stem=cfg.stem)
    else:
        model = build_model(cfg.name, in_channels=in_channels, num_classes=num_classes,
                            image_size=image_size, norm_groups=cfg.norm_groups)
        if file_weights is not None:
            pending = adapt.read_weights(file_weights, model_name=cfg.name)
    if wants_dp_fix(config):
        model, changes = adapt.dp_fix(model, norm_groups=cfg.norm_groups)
        notes += [f"DP fix: {c}" for c in changes] or ["DP fix: nothing to change"]
    if pending is not None:
        adapt.load_weights(model, pending, model_name=cfg.name, source=str(cfg.weights))
        notes.append(f"weights {cfg.weights}")
    if cfg.train_layers != "all":
        trainable = adapt.freeze(model, cfg.train_layers, head=adapt.head_name(model))
        notes.append(f"training {', '.join(trainable)} only")
    adapt.check_forward(model, model_name=cfg.name, in_channels=in_channels,
                        image_size=image_size, num_classes=num_classes, dense=dense)
    if notes:
        log.info("model %r: %s; %s", cfg.name, "; ".join(notes), adapt.describe_trainable(model))
    return model


__all__ = ["MODELS", "TORCHVISION", "build_for", "build_model", "wants_dp_fix"]
