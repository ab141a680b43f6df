"""Per-channel pixel statistics that can be accumulated in pieces and combined.

Shards store sums rather than only means so that the global normalization of a shard
set is combined exactly from the per-site sums, without reading any pixels again.
Pixels are scaled to [0, 1] (uint8 / 255).  For uint8 input the running sums are kept
as exact integers, so the result does not depend on how the data was chunked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

#: pixels per bincount call in :meth:`RunningStats.update` (8 MiB of int64)
_BINCOUNT_PIXELS = 1 << 20


@dataclass(frozen=True)
class PixelStats:
    """Per-channel count, sum and sum of squares of pixels scaled to [0, 1]."""

    pixel_count: tuple[int, ...]
    pixel_sum: tuple[float, ...]
    pixel_sumsq: tuple[float, ...]

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(s / n if n else 0.0 for s, n in zip(self.pixel_sum, self.pixel_count))

    @property
    def std(self) -> tuple[float, ...]:
        """Population standard deviation per channel (0 for an empty split)."""
        out = []
        for n, s, q in zip(self.pixel_count, self.pixel_sum, self.pixel_sumsq):
            # E[x^2] - E[x]^2 can dip below zero by rounding for constant images
            out.append(float(np.sqrt(max(q / n - (s / n) ** 2, 0.0))) if n else 0.0)
        return tuple(out)

    @classmethod
    def empty(cls, num_channels: int) -> "PixelStats":
        return cls((0,) * num_channels, (0.0,) * num_channels, (0.0,) * num_channels)


def combine(stats: Iterable[PixelStats]) -> PixelStats:
    """Statistics of the union of the pixel sets the given statistics describe."""
    items = list(stats)
    if not items:
        raise ValueError("combine() needs at least one PixelStats")
    count = np.sum([s.pixel_count for s in items], axis=0, dtype=np.int64)
    total = np.sum([s.pixel_sum for s in items], axis=0, dtype=np.float64)
    sumsq = np.sum([s.pixel_sumsq for s in items], axis=0, dtype=np.float64)
    return PixelStats(
        tuple(int(v) for v in np.atleast_1d(count)), tuple(float(v) for v in np.atleast_1d(total)),
        tuple(float(v) for v in np.atleast_1d(sumsq))
    )


class RunningStats:
    """Accumulates :class:`PixelStats` over batches of N x C x H x W images."""

    def __init__(self, num_channels: int) -> None:
        self._count = np.zeros(num_channels, dtype=np.int64)
        # exact integer sums for uint8 batches; float sums for float batches in [0, 1]
        self._int_sum = np.zeros(num_channels, dtype=np.int64)
        self._int_sumsq = np.zeros(num_channels, dtype=np.int64)
        self._float_sum = np.zeros(num_channels, dtype=np.float64)
        self._float_sumsq = np.zeros(num_channels, dtype=np.float64)

    def update(self, images: np.ndarray) -> None:
        if images.shape[0] == 0:
            return
        self._count += images.shape[0] * images.shape[2] * images.shape[3]
        if images.dtype == np.uint8:
            # a per-channel histogram of the 256 values gives exact sums in little memory;
            # bincount widens its input to int64, so it sees one block of pixels at a time
            # (a whole batch at once would cost 8 bytes a pixel)
            values = np.arange(256, dtype=np.int64)
            per_block = max(1, _BINCOUNT_PIXELS // (images.shape[2] * images.shape[3]))
            for c in range(images.shape[1]):
                hist = np.zeros(256, dtype=np.int64)
                for start in range(0, images.shape[0], per_block):
                    block = images[start : start + per_block, c]
                    hist += np.bincount(block.ravel(), minlength=256)
                self._int_sum[c] += int(hist @ values)
                self._int_sumsq[c] += int(hist @ (values * values))
        else:
            x = images.astype(np.float64, copy=False)
            self._float_sum += x.sum(axis=(0, 2, 3))
            self._float_sumsq += np.square(x).sum(axis=(0, 2, 3))

    def result(self) -> PixelStats:
        total = self._int_sum / 255.0 + self._float_sum
        sumsq = self._int_sumsq / 65025.0 + self._float_sumsq
        return PixelStats(
            tuple(int(v) for v in self._count),
            tuple(float(v) for v in total),
            tuple(float(v) for v in sumsq),
        )
