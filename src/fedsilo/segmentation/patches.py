"""Training batches of a segmentation split: random patches of whole images, and
augmentation applied to image and mask together.

A patch is centred, with probability ``foreground``, on a pixel drawn uniformly from the
image's non-background pixels (nnU-Net's oversampling of foreground, Isensee et al., Nature
Methods 18, 2021, which keeps thin or rare structures such as vessels in most patches);
otherwise anywhere.  Images smaller than a patch are padded (image with 0, mask with
background).  Every draw comes from the generator given, so a round's patches are a pure
function of its seed (``--resume`` stays bit-identical).

Augmentations are the exact symmetries of the pixel grid (flips and 90-degree rotations):
they move image and label pixels alike, with no interpolation, so a mask stays aligned with
its image by construction.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def crop_patches(images: torch.Tensor, masks: torch.Tensor, *, size: int, foreground: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``size`` x ``size`` patch of each image (``images`` N x C x H x W, ``masks``
    N x H x W), the same window in both.

    >>> g = torch.Generator().manual_seed(0)
    >>> x, m = torch.zeros(2, 3, 10, 12), torch.zeros(2, 10, 12, dtype=torch.uint8)
    >>> [tuple(t.shape) for t in crop_patches(x, m, size=8, foreground=0.5, generator=g)]
    [(2, 3, 8, 8), (2, 8, 8)]
    """
    if not images.shape[0]:  # DP-SGD's Poisson sampling may draw no image at all
        return (images.new_zeros((0, images.shape[1], size, size)),
                masks.new_zeros((0, size, size)))
    pad_h, pad_w = max(0, size - images.shape[-2]), max(0, size - images.shape[-1])
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
        masks = F.pad(masks, (0, pad_w, 0, pad_h))
    height, width = images.shape[-2:]
    out_x, out_m = [], []
    for i in range(images.shape[0]):
        # every image takes the same number of draws, so one's content never shifts another's
        wants_fg = float(torch.rand((), generator=generator)) < foreground
        pick = torch.rand((), generator=generator)
        top = int(torch.randint(0, height - size + 1, (), generator=generator))
        left = int(torch.randint(0, width - size + 1, (), generator=generator))
        if wants_fg:
            fg = torch.nonzero(masks[i].reshape(-1)).flatten()
            if fg.numel():
                flat = int(fg[min(int(pick * fg.numel()), fg.numel() - 1)])
                cy, cx = divmod(flat, width)
                top = min(max(cy - size // 2, 0), height - size)
                left = min(max(cx - size // 2, 0), width - size)
        out_x.append(images[i, :, top: top + size, left: left + size])
        out_m.append(masks[i, top: top + size, left: left + size])
    return torch.stack(out_x), torch.stack(out_m)


def augment_pair(images: torch.Tensor, masks: torch.Tensor, *, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair flipped (horizontally, with p 1/2) and rotated by k·90° (k uniform in
    0..3; square patches keep their shape), image and mask alike.

    >>> g = torch.Generator().manual_seed(1)
    >>> x = torch.arange(16.).view(1, 1, 4, 4)
    >>> y, m = augment_pair(x, x[:, 0].long(), generator=g)
    >>> bool((y[:, 0].long() == m).all())
    True
    """
    if not images.shape[0]:
        return images, masks
    out_x, out_m = [], []
    for i in range(images.shape[0]):
        flip = bool(torch.rand((), generator=generator) < 0.5)
        turns = int(torch.randint(0, 4, (), generator=generator))
        x, m = images[i], masks[i]
        if flip:
            x, m = x.flip(-1), m.flip(-1)
        if turns and x.shape[-1] == x.shape[-2]:
            x, m = torch.rot90(x, turns, (-2, -1)), torch.rot90(m, turns, (-2, -1))
        out_x.append(x)
        out_m.append(m)
    return torch.stack(out_x), torch.stack(out_m)
