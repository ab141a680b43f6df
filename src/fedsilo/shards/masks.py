"""Reading the label maps of a segmentation shard (``/<split>/masks``, see ``hdf5.py``).

The one reader of masks: it checks the shard is a segmentation shard, that the masks are
uint8 label maps of the images' size, one per image, within the size fedsilo accepts, and
that every value is a known class, before anything trains on them.  Every problem is a
:class:`~fedsilo.errors.ShardError` naming the file and the cause.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from fedsilo.errors import ShardError
from fedsilo.shards.hdf5 import to_python

#: the most label-map pixels one split may hold (8 GiB of uint8): a hostile shard must not
#: make a rank allocate more
MAX_MASK_VALUES = 1 << 33
#: the most values one label map may hold (as the manifest bounds an image)
MAX_MAP_VALUES = 1 << 26


def shard_task(path: str | os.PathLike[str]) -> str:
    """``segmentation`` or ``classification``: what the shard file at ``path`` is for."""
    try:
        with h5py.File(path, "r") as f:
            task = to_python(f.attrs.get("task", "classification"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ShardError(f"{path}: cannot read shard: {exc}") from exc
    if task not in ("classification", "segmentation"):
        raise ShardError(f"{path}: unknown task {task!r} (classification or segmentation)")
    return str(task)


def read_masks(path: str | os.PathLike[str], split: str) -> np.ndarray:
    """Every label map of ``split`` (uint8, N x H x W), validated against the images.

    >>> import tempfile, pathlib
    >>> from fedsilo.shards import ShardWriter
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.h5"
    >>> with ShardWriter(p, kind="test", image_shape=(1, 2, 3), num_classes=2,
    ...                  masks=True) as w:
    ...     w.append("test", np.zeros((1, 1, 2, 3), np.uint8), np.array([1]),
    ...              masks=np.array([[[0, 1, 1], [0, 0, 1]]], np.uint8))
    >>> read_masks(p, "test")[0].tolist()
    [[0, 1, 1], [0, 0, 1]]
    """
    path = Path(path)
    where = f"{path} [{split}]"
    try:
        with h5py.File(path, "r") as f:
            task = to_python(f.attrs.get("task"))
            if task != "segmentation":
                raise ShardError(f"{path}: not a segmentation shard (task {task!r})")
            num_classes = to_python(f.attrs.get("num_classes"))
            if not isinstance(num_classes, int) or isinstance(num_classes, bool) \
                    or not 1 <= num_classes <= 256:
                raise ShardError(f"{path}: num_classes {num_classes!r} is not in [1, 256] "
                                 f"(a uint8 label map)")
            if split not in f or not isinstance(f[split], h5py.Group):
                raise ShardError(f"{where}: no such split")
            group = f[split]
            if not isinstance(group.get("masks"), h5py.Dataset) \
                    or not isinstance(group.get("images"), h5py.Dataset):
                raise ShardError(f"{where}: a segmentation split needs 'images' and 'masks'")
            masks, images = group["masks"], group["images"]
            if masks.dtype != np.uint8 or masks.ndim != 3:
                raise ShardError(f"{where}: masks must be uint8 N x H x W, got {masks.dtype} "
                                 f"{masks.shape}")
            if images.ndim != 4 or masks.shape[0] != images.shape[0] \
                    or tuple(masks.shape[1:]) != tuple(images.shape[2:]):
                raise ShardError(f"{where}: masks {masks.shape} do not match images "
                                 f"{images.shape} (one H x W map per image)")
            per_map = int(masks.shape[1]) * int(masks.shape[2])
            if per_map > MAX_MAP_VALUES or per_map * int(masks.shape[0]) > MAX_MASK_VALUES:
                raise ShardError(f"{where}: masks {masks.shape} are beyond the size fedsilo "
                                 f"reads")
            data = masks[()]
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ShardError(f"{where}: cannot read masks: {exc}") from exc
    if data.size and int(data.max()) >= num_classes:
        raise ShardError(f"{where}: label value {int(data.max())} is outside [0, "
                         f"{num_classes}) (num_classes={num_classes})")
    return data
