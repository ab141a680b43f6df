"""Reading rows of one split of a shard without loading the split: by chunk, with a cache.

The images of a split are stored in chunks of ``chunk_rows`` images along N (gzip+shuffle,
see ``hdf5.py``).  A batch of random rows costs one decompressed chunk per distinct chunk it
touches, so :meth:`SplitReader.read` takes rows **sorted**, groups them by chunk and
decompresses each chunk once per call.  Chunks of fedsilo's own layout (uint8, deflate with
or without shuffle, which leaves one-byte pixels as they are) are read raw with
``read_direct_chunk`` and inflated with ``zlib``, which releases the GIL, so a reader
thread overlaps with training; any other layout goes through HDF5's filter pipeline.

The cache keeps chunks as they are first read until ``cache_bytes`` are used, and then
keeps those: not LRU, because every pass over a split (an epoch, a window of Poisson
batches, an evaluation) reads its chunks in the same ascending order, where LRU would evict
each chunk just before it is needed again.  A split that fits is read from disk once.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import h5py
import numpy as np

from fedsilo.errors import ShardError

#: HDF5 filter ids this reader inflates itself (deflate; shuffle on one-byte elements)
_DEFLATE, _SHUFFLE = 1, 2
#: labels are read in blocks of this many rows
_LABEL_BLOCK = 1 << 16


class SplitReader:
    """Rows of ``/<split>/images`` of one shard file, read by chunk.

    >>> import tempfile, pathlib
    >>> from fedsilo.shards import write_shard
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.h5"
    >>> images = np.arange(5 * 4, dtype=np.uint8).reshape(5, 1, 2, 2)
    >>> _ = write_shard(path, kind="test", splits={"test": (images, np.zeros(5, int))},
    ...                 num_classes=1)
    >>> reader = SplitReader(path, "test", cache_bytes=0)
    >>> reader.read(np.array([1, 4]))[:, 0, 0, 0].tolist()
    [4, 16]
    >>> reader.close()
    """

    def __init__(self, path: str | os.PathLike[str], split: str, *, cache_bytes: int) -> None:
        self.path, self.split = Path(path), split
        self.where = f"{self.path} [{split}]"
        try:
            # no HDF5 chunk cache: this class keeps its own (decompressed, bounded)
            self._file = h5py.File(self.path, "r", rdcc_nbytes=0)
            self._images = self._file[split]["images"]
            self._labels = self._file[split]["labels"]
            attrs = self._file[split].attrs
            self.mean = np.asarray(attrs["mean"], dtype=np.float64)
            self.std = np.asarray(attrs["std"], dtype=np.float64)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ShardError(f"{self.where}: cannot open for reading: {exc}") from exc
        images = self._images
        self.num_samples = int(images.shape[0])
        self.image_shape = tuple(int(v) for v in images.shape[1:])
        self.dtype = np.dtype(images.dtype)
        self.chunk_rows = int(images.chunks[0]) if images.chunks else max(self.num_samples, 1)
        self.row_bytes = int(np.prod(self.image_shape)) * self.dtype.itemsize
        self._direct = images.chunks is not None and self.dtype == np.uint8 \
            and tuple(images.chunks[1:]) == self.image_shape and _deflate_only(images)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0
        #: chunks decompressed from the file (not from the cache) so far
        self.chunks_read = 0

    def labels(self) -> np.ndarray:
        """Every label of the split (int64): small next to the images, so held in memory."""
        try:
            return np.concatenate(
                [self._labels[start: start + _LABEL_BLOCK].astype(np.int64, copy=False)
                 for start in range(0, self.num_samples, _LABEL_BLOCK)]
                or [np.zeros(0, dtype=np.int64)])
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ShardError(f"{self.where}: cannot read labels: {exc}") from exc

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The images of ``rows`` (ascending, no repeats), in that order, into ``out``."""
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((rows.size, *self.image_shape), dtype=self.dtype)
        if rows.size == 0:
            return out
        if rows[0] < 0 or rows[-1] >= self.num_samples:
            raise IndexError(f"{self.where}: rows outside [0, {self.num_samples})")
        chunk_of = rows // self.chunk_rows
        starts = np.flatnonzero(np.diff(chunk_of)) + 1
        for begin, end in zip(np.r_[0, starts], np.r_[starts, rows.size]):
            chunk = int(chunk_of[begin])
            block = self._chunk(chunk)
            np.take(block, rows[begin:end] - chunk * self.chunk_rows, axis=0,
                    out=out[begin:end])
        return out

    def _chunk(self, chunk: int) -> np.ndarray:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.num_samples)
        try:
            block = self._read_direct(start, stop) if self._direct else None
            if block is None:
                block = self._images[start:stop]
        except (OSError, KeyError, ValueError, RuntimeError, zlib.error) as exc:
            raise ShardError(f"{self.where}: cannot read images {start}..{stop - 1} "
                             f"(the file changed or is damaged): {exc}") from exc
        self.chunks_read += 1
        if self._cached_bytes + block.nbytes <= self.cache_bytes:
            self._cache[chunk] = block
            self._cached_bytes += block.nbytes
        return block

    def _read_direct(self, start: int, stop: int) -> np.ndarray | None:
        mask, raw = self._images.id.read_direct_chunk((start, 0, 0, 0))
        if mask:  # a filter was skipped for this chunk: let HDF5 decode it
            return None
        data = zlib.decompress(raw) if self._compressed else raw
        if len(data) != self.chunk_rows * self.row_bytes:
            raise ShardError(f"{self.where}: chunk at image {start} holds {len(data)} bytes, "
                             f"expected {self.chunk_rows * self.row_bytes}")
        return np.frombuffer(data, dtype=np.uint8).reshape(
            self.chunk_rows, *self.image_shape)[: stop - start]

    @property
    def _compressed(self) -> bool:
        return self._images.compression == "gzip"

    def close(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0
        try:
            self._file.close()
        except Exception:  # closing a file that went bad must not hide the first error
            pass


def _deflate_only(dataset: h5py.Dataset) -> bool:
    """Whether every filter of ``dataset`` is one :class:`SplitReader` undoes itself."""
    plist = dataset.id.get_create_plist()
    return all(plist.get_filter(i)[0] in (_DEFLATE, _SHUFFLE)
               for i in range(plist.get_nfilters()))
