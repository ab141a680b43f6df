"""A CNN made for DP-SGD: few parameters and tempered-sigmoid (tanh) activations.

Papernot, Thakurta, Song, Chien & Erlingsson, "Tempered Sigmoid Activations for Deep
Learning with Differential Privacy" (AAAI 2021): bounded activations keep the gradient
norms small, so less signal is lost to per-sample clipping, and a small parameter count
keeps the noise norm (which grows with √d) low.  The architecture is theirs for MNIST
(also Opacus's MNIST example): 26k parameters against the small CNN's 421k.
"""

from __future__ import annotations

import torch
from torch import nn


class DPCNN(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        )
        with torch.no_grad():
            size = self.features(torch.zeros(1, in_channels, *image_size)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(size, 32), nn.Tanh(), nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def dp_cnn(*, in_channels: int, num_classes: int, image_size: tuple[int, int],
           norm_groups: int = 32) -> nn.Module:
    del norm_groups  # no normalization layers
    return DPCNN(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
