"""Augmentation of training batches from ``data.augment`` (torchvision.transforms.v2), and
DP-SGD's augmentation multiplicity (De et al., "Unlocking High-Accuracy Differentially
Private Image Classification through Scale", 2022): K views of each sample, whose
gradients the engine averages before clipping.

transforms.v2 draws its parameters from torch's global generator and, given a batch, uses
one draw for the whole batch.  Here every image gets its own draws, and they are
reproducible: each batch takes one seed from the round's augmentation generator
(:func:`fedsilo.training.augment_seed`) and the batch's transforms run under
``torch.random.fork_rng`` seeded with it, so the global generator (dropout) is left as it
was and the views depend on (seed, round, site, batch) alone.  Augmentation is not a
privacy mechanism: DP-SGD's clipping bound holds for whatever views are drawn.

torchvision is imported only when an augmentation is on: a plain run does without it.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsilo.config import AugmentConfig
from fedsilo.errors import ConfigError


class Augmenter:
    """``(raw pixels, labels) -> (views, labels)`` for one batch, ``views`` per sample,
    sample-major (the K views of sample i are rows iK .. iK+K-1)."""

    def __init__(self, config: AugmentConfig, *, image_shape: tuple[int, int, int],
                 views: int = 1) -> None:
        from torchvision.transforms import v2

        channels, height, width = image_shape
        if config.color_jitter > 0 and channels != 3:
            raise ConfigError(f"data.augment.color_jitter={config.color_jitter} jitters "
                              f"colours, but the shard set's images have {channels} "
                              f"channel(s), not 3 (RGB); set data.augment.color_jitter=0")
        steps: list[Any] = []
        if config.crop_scale < 1:
            steps.append(v2.RandomResizedCrop((height, width), scale=(config.crop_scale, 1.0),
                                              antialias=True))
        if config.flip:
            steps.append(v2.RandomHorizontalFlip())
        if config.rotation > 0:
            steps.append(v2.RandomRotation(config.rotation))
        if config.color_jitter > 0:
            jitter = config.color_jitter
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        self.transform = v2.Compose(steps)
        self.views = views

    def __call__(self, pixels: torch.Tensor, labels: torch.Tensor, *,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if pixels.shape[0] == 0:
            return pixels, labels
        # v2 draws every parameter on the CPU generator, whatever device the images are on
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = [self.transform(image) for image in pixels for _ in range(self.views)]
        return torch.stack(views), labels.repeat_interleave(self.views)

    def bind(self, generator: torch.Generator) -> Any:
        """This augmenter as a batch transform drawing from ``generator``."""
        return lambda pixels, labels: self(pixels, labels, generator=generator)
