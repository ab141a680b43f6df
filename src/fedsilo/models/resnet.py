"""ResNet-18 (He et al., CVPR 2016) from torchvision, with GroupNorm (Wu & He, ECCV 2018)
instead of BatchNorm, so that it neither mixes samples within a batch (which DP-SGD
forbids) nor keeps running statistics that FedAvg would average badly.

The model is DP-ready: GroupNorm, non-inplace ReLUs, and residual blocks that add the
shortcut out of place (torchvision's ``BasicBlock`` does ``out += identity``, which fails
the first per-sample backward pass under Opacus).  The parameter names are torchvision's.

For small images (MedMNIST's 28×28) the stem is a 3×3 stride-1 convolution without the
max-pool, as in the MedMNIST v2 "ResNet-18 (28)" baseline.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from fedsilo.errors import ModelError

#: images up to this side length get the small-image stem
SMALL_IMAGE = 64


def _group_norm(channels: int, *, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ModelError(f"GroupNorm: {channels} channels are not divisible by {groups} groups "
                         f"(model.norm_groups)")
    return nn.GroupNorm(groups, channels)


class OutOfPlaceBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` with the residual added out of place (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def resnet18(*, in_channels: int, num_classes: int, image_size: tuple[int, int],
             norm_groups: int = 32) -> nn.Module:
    model = ResNet(OutOfPlaceBasicBlock, [2, 2, 2, 2], num_classes=num_classes,
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
