"""A source dataset in memory, as every converter hands it to the shard pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsilo.errors import DataError

#: split names a source may carry; "train" is required
SOURCE_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SourceData:
    """Labelled images: ``splits[name] = (uint8 N x C x H x W, int64 N)``.

    ``provenance`` is free-form JSON-able metadata copied into the manifest's ``source``.
    """

    name: str
    num_classes: int
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = f"source {self.name!r}"
        if "train" not in self.splits:
            raise DataError(f"{name} has no 'train' split")
        unknown = sorted(set(self.splits) - set(SOURCE_SPLITS))
        if unknown:
            raise DataError(f"{name}: unknown splits {unknown}; known: {list(SOURCE_SPLITS)}")
        if self.num_classes < 1:
            raise DataError(f"{name}: num_classes must be positive, got {self.num_classes}")
        shape = None
        for split, (images, labels) in self.splits.items():
            where = f"{name} split {split!r}"
            if images.dtype != np.uint8 or images.ndim != 4:
                raise DataError(
                    f"{where}: images must be uint8 NCHW, got {images.dtype} {images.shape}"
                )
            if shape is not None and images.shape[1:] != shape:
                raise DataError(f"{where}: image shape {images.shape[1:]} differs from {shape}")
            shape = images.shape[1:]
            if labels.dtype != np.int64 or labels.shape != (len(images),):
                raise DataError(
                    f"{where}: labels must be int64 of shape ({len(images)},), "
                    f"got {labels.dtype} {labels.shape}"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(f"{where}: labels must lie in [0, {self.num_classes})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.splits["train"][0].shape[1:]
        return (int(c), int(h), int(w))
