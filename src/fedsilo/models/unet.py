"""U-Nets for segmentation, from MONAI (Cardoso et al., "MONAI: An open-source framework for
deep learning in healthcare", 2022; Ronneberger et al., MICCAI 2015, for the U-Net).

Neither uses BatchNorm (a batch's statistics would mix samples under DP and differ between
patch training and sliding-window inference): ``basic_unet`` has GroupNorm, ``unet``
InstanceNorm (MONAI's UNet norms its last layer too, over as few channels as classes,
which GroupNorm with several groups cannot); both use ReLU, not in place.
``basic_unet`` upsamples by interpolation followed by a convolution, so its only
parametrized layers are Conv2d and GroupNorm, for which DP-SGD's per-sample clipping is
exact (``privacy/ghost.py``); ``unet`` (MONAI's residual U-Net) upsamples with transposed
convolutions.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def _groups(norm_groups: int, channels: int) -> int:
    return math.gcd(int(norm_groups), int(channels))


def unet(*, in_channels: int, num_classes: int, image_size: tuple[int, int],
         norm_groups: int = 32, **_: Any) -> nn.Module:
    """MONAI ``UNet``, channels 16-32-64-128, 2 residual units per level."""
    from monai.networks.nets import UNet

    channels = (16, 32, 64, 128)
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                channels=channels, strides=(2, 2, 2), num_res_units=2,
                norm="instance", act=("relu", {"inplace": False}))


def basic_unet(*, in_channels: int, num_classes: int, image_size: tuple[int, int],
               norm_groups: int = 32, **_: Any) -> nn.Module:
    """MONAI ``BasicUNet``, features 16-16-32-64-128, interpolating upsampling."""
    from monai.networks.nets import BasicUNet

    features = (16, 16, 32, 64, 128, 16)
    return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                     features=features,
                     norm=("group", {"num_groups": _groups(norm_groups, features[0])}),
                     act=("relu", {"inplace": False}), upsample="nontrainable")
