"""Sliding-window inference over whole images (as MONAI's ``sliding_window_inference``,
with uniform weights): windows of the training patch size, ``overlap`` of a window apart,
the last one flush with the edge; where windows overlap their logits are averaged.  An
image smaller than a window is padded and the padding cut off again, so any image size
works with a model that needs sides divisible by its downsampling.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F


def window_starts(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``size`` covering ``length``.

    >>> window_starts(10, 4, 0.5), window_starts(3, 4, 0.5)
    ([0, 2, 4, 6], [0])
    """
    if length <= size:
        return [0]
    step = max(1, int(size * (1 - overlap)))
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


@torch.no_grad()
def sliding_window(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *,
                   size: int, overlap: float = 0.25, batch_size: int = 8) -> torch.Tensor:
    """Logits N x K x H x W of ``model`` over ``images`` (N x C x H x W), window by window."""
    n, _, height, width = images.shape
    pad_h, pad_w = max(0, size - height), max(0, size - width)
    padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    ph, pw = padded.shape[-2:]
    spots = [(t, left) for t in window_starts(ph, size, overlap)
             for left in window_starts(pw, size, overlap)]
    out: torch.Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=images.device)
    for t, left in spots:
        count[..., t: t + size, left: left + size] += 1
    for i in range(n):
        for begin in range(0, len(spots), batch_size):
            chunk = spots[begin: begin + batch_size]
            batch = torch.stack([padded[i, :, t: t + size, left: left + size]
                                 for t, left in chunk])
            logits = model(batch).float()
            if out is None:
                out = torch.zeros(n, logits.shape[1], ph, pw, device=images.device)
            for (t, left), piece in zip(chunk, logits):
                out[i, :, t: t + size, left: left + size] += piece
    assert out is not None
    return (out / count)[..., :height, :width]
