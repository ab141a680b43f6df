"""ResNet-18 (He et al., CVPR 2016) from torchvision, with GroupNorm (Wu & He, ECCV 2018)
instead of BatchNorm, so that it neither mixes samples within a batch (which DP-SGD
forbids) nor keeps running statistics that FedAvg would average badly.

For small images (MedMNIST's 28×28) the stem is a 3×3 stride-1 convolution without the
max-pool, as in the MedMNIST v2 "ResNet-18 (28)" baseline.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from fedsilo.errors import ModelError
from fedsilo.models.registry import MODELS

#: images up to this side length get the small-image stem
SMALL_IMAGE = 64


def _group_norm(channels: int, *, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ModelError(f"GroupNorm: {channels} channels are not divisible by {groups} groups "
                         f"(model.norm_groups)")
    return nn.GroupNorm(groups, channels)


@MODELS.register("resnet18")
def resnet18(*, in_channels: int, num_classes: int, image_size: tuple[int, int],
             norm_groups: int = 32) -> nn.Module:
    model = tv_resnet18(weights=None, num_classes=num_classes,
                        norm_layer=partial(_group_norm, groups=norm_groups))
    if max(image_size) <= SMALL_IMAGE:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    for module in model.modules():  # in-place activations break per-sample gradient hooks
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model
