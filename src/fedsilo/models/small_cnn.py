"""A small CNN (two conv blocks and two dense layers), the quick baseline of FL papers
(the "CNN" of McMahan et al. 2017, without BatchNorm)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        height, width = (image_size[0] // 4, image_size[1] // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * height * width, 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def small_cnn(*, in_channels: int, num_classes: int, image_size: tuple[int, int],
              norm_groups: int = 32) -> nn.Module:
    del norm_groups  # no normalization layers
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
