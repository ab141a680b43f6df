"""Handcrafted ScatterNet features with a small trainable model on top, for DP-SGD.

Tramèr & Boneh, "Differentially Private Learning Needs Better Features (or Much More
Data)" (ICLR 2021): a fixed wavelet scattering transform (Bruna & Mallat 2013; Kymatio's
``Scattering2D``, J = 2, L = 8 orientations: 81 channels per input channel at a quarter of
the image side) followed by a normalization and a linear head or a small CNN beats
end-to-end DP CNNs at ε ≤ 3 on MNIST, Fashion-MNIST and CIFAR-10.  The scattering has no
parameters, so DP-SGD clips and noises only the small model on top (``scatter_linear``:
3,969 weights per class at 28 px; ``scatter_cnn``: ~25k parameters), and the noise norm,
which grows with √d, stays small.

The features are normalized by a GroupNorm (27 groups of the 81 channels, as the paper's
"data normalization" does without BatchNorm, which DP-SGD cannot use).

The scattering is a fixed function of each image, so :class:`Scattering` computes it once
per distinct image and keeps the result in memory (keyed by a BLAKE2b digest of the image's
bytes, up to :data:`CACHE_BYTES` per model): without augmentation, every round after the
first reads its training batches' features from the cache.  The filters are not part of the
state dict: they are rebuilt identically from (J, L, shape), so nothing of them travels.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

#: scattering scales (the features are at 1 / 2^J of the image side) and orientations
J, ORIENTATIONS = 2, 8
#: memory the feature cache of one model may hold (least recently used entries go first)
CACHE_BYTES = 1 << 30


def _frontend(shape: tuple[int, int]) -> Any:
    # kymatio.torch also imports the 3-D scattering, whose filter bank needs
    # scipy.special.sph_harm (removed in SciPy 1.17): import the 2-D front end alone
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=J, shape=shape, L=ORIENTATIONS)


class Scattering(nn.Module):
    """(N, C, H, W) images -> (N, 81·C, H/4, W/4) scattering coefficients, no parameters,
    cached per distinct image."""

    def __init__(self, *, in_channels: int, image_size: tuple[int, int],
                 cache_bytes: int = CACHE_BYTES) -> None:
        super().__init__()
        # not a submodule: its filter buffers would enter the state dict and travel
        self._transform = [_frontend(image_size)]
        self._device: torch.device | None = None
        count = 1 + J * ORIENTATIONS + ORIENTATIONS ** 2 * J * (J - 1) // 2
        self.out_channels = count * in_channels
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._cached = 0

    def _scatter(self, x: torch.Tensor) -> torch.Tensor:
        transform = self._transform[0]
        if self._device != x.device:
            transform.to(x.device)
            self._device = x.device
        out = transform(x.float())  # (N, C, 81, H', W')
        return out.reshape(out.shape[0], -1, *out.shape[-2:]).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()  # a fixed transform of the data: no gradient flows into the images
        if self.cache_bytes <= 0:
            return self._scatter(x)
        host = x.contiguous().cpu().numpy()
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in host]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            fresh = self._scatter(x[missing])
            for i, features in zip(missing, fresh):
                self._remember(keys[i], features)
        out = []
        for key in keys:
            features = self._cache.get(key)
            if features is None:  # evicted by this very batch (a cache smaller than it)
                return self._scatter(x)
            self._cache.move_to_end(key)
            out.append(features)
        return torch.stack(out)

    def _remember(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.cache_bytes:
            return
        self._cache[key] = features.detach().clone()
        self._cached += size
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.numel() * old.element_size()


def _groups(channels: int) -> int:
    """27 groups where they divide the channels (81 per input channel), else 1."""
    return 27 if channels % 27 == 0 else 1


class ScatterLinear(nn.Module):
    """Scattering, GroupNorm, a linear classifier."""

    def __init__(self, *, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.scattering = Scattering(in_channels=in_channels, image_size=image_size)
        channels = self.scattering.out_channels
        self.norm = nn.GroupNorm(_groups(channels), channels)
        with torch.no_grad():
            size = self.scattering(torch.zeros(1, in_channels, *image_size)).numel()
        self.scattering._cache.clear()
        self.scattering._cached = 0
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(size, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.scattering(x)))


class ScatterCNN(nn.Module):
    """Scattering, GroupNorm, two tanh convolutions (16 and 32 channels, GroupNorm), a tanh
    hidden layer of 32 and a linear head (Tramèr & Boneh's ScatterNet+CNN, scaled to
    28 px; tanh as Papernot et al. 2021 advise under DP)."""

    def __init__(self, *, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.scattering = Scattering(in_channels=in_channels, image_size=image_size)
        channels = self.scattering.out_channels
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Tanh(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.Tanh(),
        )
        with torch.no_grad():
            size = self.features(self.norm(self.scattering(
                torch.zeros(1, in_channels, *image_size)))).numel()
        self.scattering._cache.clear()
        self.scattering._cached = 0
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(size, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.norm(self.scattering(x))))


def scatter_linear(*, in_channels: int, num_classes: int, image_size: tuple[int, int],
                   norm_groups: int = 32) -> nn.Module:
    del norm_groups  # the groups follow the scattering's channels
    return ScatterLinear(in_channels=in_channels, num_classes=num_classes, image_size=image_size)


def scatter_cnn(*, in_channels: int, num_classes: int, image_size: tuple[int, int],
                norm_groups: int = 32) -> nn.Module:
    del norm_groups
    return ScatterCNN(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
