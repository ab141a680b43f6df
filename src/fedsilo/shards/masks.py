"""Reading the label maps of a segmentation shard (``/<split>/masks``, see ``hdf5.py``).

The one reader of masks (:class:`MaskReader`; :func:`read_masks` reads a whole split with
it): it checks the shard is a segmentation shard, that the masks are uint8 label maps of
the images' size, one per image, within the size fedsilo accepts, and that every value it
hands out is a known class, before anything trains on them.  Every problem is a
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
_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)


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


def mask_problem(f: h5py.File, split: str) -> tuple[str | None, int]:
    """What makes ``/<split>/masks`` of the open segmentation shard ``f`` unreadable (None
    when nothing does), and the shard's ``num_classes``: the checks of every mask read and
    of ``check_shard``."""
    num_classes = to_python(f.attrs.get("num_classes"))
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) \
            or not 1 <= num_classes <= 256:
        return (f"num_classes {num_classes!r} is not in [1, 256] (a uint8 label map)", 0)
    if split not in f or not isinstance(f[split], h5py.Group):
        return f"[{split}]: no such split", num_classes
    group = f[split]
    if not isinstance(group.get("masks"), h5py.Dataset) \
            or not isinstance(group.get("images"), h5py.Dataset):
        return f"[{split}]: a segmentation split needs 'images' and 'masks'", num_classes
    masks, images = group["masks"], group["images"]
    if masks.dtype != np.uint8 or masks.ndim != 3:
        return (f"[{split}]: masks must be uint8 N x H x W, got {masks.dtype} {masks.shape}",
                num_classes)
    if images.ndim != 4 or masks.shape[0] != images.shape[0] \
            or tuple(masks.shape[1:]) != tuple(images.shape[2:]):
        return (f"[{split}]: masks {masks.shape} do not match images {images.shape} (one "
                f"H x W map per image)", num_classes)
    per_map = int(masks.shape[1]) * int(masks.shape[2])
    if per_map > MAX_MAP_VALUES or per_map * int(masks.shape[0]) > MAX_MASK_VALUES:
        return f"[{split}]: masks {masks.shape} are beyond the size fedsilo reads", num_classes
    return None, num_classes


class MaskReader:
    """The label maps of one split of a segmentation shard, read by image (what a streamed
    split reads beside its images, ``segmentation/task.py``).

    >>> import tempfile, pathlib
    >>> from fedsilo.shards import ShardWriter
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.h5"
    >>> with ShardWriter(p, kind="test", image_shape=(1, 2, 3), num_classes=2,
    ...                  masks=True) as w:
    ...     w.append("test", np.zeros((2, 1, 2, 3), np.uint8), np.array([1, 0]),
    ...              masks=np.array([[[0, 1, 1], [0, 0, 1]], [[0] * 3] * 2], np.uint8))
    >>> reader = MaskReader(p, "test")
    >>> reader.read(np.array([0]))[0].tolist(), reader.shape
    ([[0, 1, 1], [0, 0, 1]], (2, 2, 3))
    >>> reader.close()
    """

    def __init__(self, path: str | os.PathLike[str], split: str) -> None:
        self.path, self.split = Path(path), split
        self.where = f"{self.path} [{split}]"
        try:
            self._file = h5py.File(self.path, "r")
        except _READ_ERRORS as exc:
            raise ShardError(f"{self.where}: cannot read masks: {exc}") from exc
        try:
            task = to_python(self._file.attrs.get("task"))
            if task != "segmentation":
                raise ShardError(f"{self.path}: not a segmentation shard (task {task!r})")
            problem, self.num_classes = mask_problem(self._file, split)
            if problem is not None:
                raise ShardError(f"{self.path}{' ' if problem.startswith('[') else ': '}"
                                 f"{problem}")
            self._masks = self._file[split]["masks"]
            self.shape = tuple(int(v) for v in self._masks.shape)
        except ShardError:
            self.close()
            raise
        except _READ_ERRORS as exc:
            self.close()
            raise ShardError(f"{self.where}: cannot read masks: {exc}") from exc

    @property
    def num_samples(self) -> int:
        return self.shape[0]

    @property
    def map_bytes(self) -> int:
        """Bytes of one label map."""
        return self.shape[1] * self.shape[2]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The label maps of ``rows`` (ascending), uint8 len(rows) x H x W, every value a
        class of the shard."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, *self.shape[1:]), dtype=np.uint8)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise IndexError(f"{self.where}: rows outside [0, {self.num_samples})")
        try:
            # consecutive rows in one slice: a whole split is one read
            starts = np.flatnonzero(np.diff(rows) != 1) + 1
            for begin, end in zip(np.r_[0, starts], np.r_[starts, rows.size]):
                if end > begin:
                    first = int(rows[begin])
                    self._masks.read_direct(out, np.s_[first: first + end - begin],
                                            np.s_[begin:end])
        except _READ_ERRORS as exc:
            raise ShardError(f"{self.where}: cannot read masks (the file changed or is "
                             f"damaged): {exc}") from exc
        if out.size and int(out.max()) >= self.num_classes:
            raise ShardError(f"{self.where}: label value {int(out.max())} is outside [0, "
                             f"{self.num_classes}) (num_classes={self.num_classes})")
        return out

    def close(self) -> None:
        try:
            self._file.close()
        except Exception:  # closing a file that went bad must not hide the first error
            pass


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
    reader = MaskReader(path, split)
    try:
        return reader.read(np.arange(reader.num_samples))
    finally:
        reader.close()
