"""Writing and reading one shard file (HDF5).

Layout (format 1)::

    /                 attrs: fedsilo_format=1, kind="site"|"test", num_classes,
                             image_shape=[C, H, W], site (sites only), extra attrs
    /<split>/images   uint8 N x C x H x W, chunked along N, gzip 4 + shuffle
    /<split>/labels   int64 N
    /<split>          attrs: num_samples, class_counts[num_classes], pixel_count[C],
                             pixel_sum[C], pixel_sumsq[C], mean[C], std[C]

A segmentation shard (root attr ``task="segmentation"``, written with ``masks=True``) adds
one uint8 label map per image, chunked in tiles so a patch reads a few small chunks::

    /<split>/masks    uint8 N x H x W, chunks 1 x 256 x 256, gzip 4 + shuffle
    /<split>          attrs: pixel_class_counts[num_classes] (label-map pixels per class)

Its ``labels`` are each image's highest class present (0: background only), so the
partitioners stratify by them; its ``num_classes`` counts the label-map classes.

Splits are ``train`` and ``val`` in a site shard and ``test`` in the test shard; the
statistics are over pixels scaled to [0, 1].  Files are written to a temporary name
in the same directory and renamed into place only once complete, so a reader never sees
half a shard and a failed write never clobbers a good one.

Compressing the images is most of the cost of writing a shard, so the writer compresses
each full chunk itself (zlib at the dataset's level, on ``threads`` threads: zlib
releases the GIL) and hands HDF5 the finished chunk (``write_direct_chunk``).  The bytes
are those HDF5's own filter pipeline writes -- the shuffle filter leaves one-byte
elements as they are, and deflate is zlib -- so readers see an ordinary gzip+shuffle
dataset, and the file does not depend on the number of threads.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from fedsilo.errors import DataError, ShardError
from fedsilo.shards.stats import PixelStats, RunningStats

FORMAT_VERSION = 1

#: the splits each kind of shard holds, in file order
SPLITS_BY_KIND: dict[str, tuple[str, ...]] = {"site": ("train", "val"), "test": ("test",)}

#: root attributes the format itself owns (extra ``attrs`` may not use these names)
RESERVED_ATTRS = ("fedsilo_format", "kind", "num_classes", "image_shape")

#: images per HDF5 chunk, capped so one chunk stays near 1 MiB for large images
CHUNK_IMAGES = 256
_CHUNK_BYTES = 1 << 20
_LABEL_CHUNK = 4096
#: the side of a mask chunk (a tile of a label map)
MASK_TILE = 256
_GZIP_LEVEL = 4
_HASH_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    return file_digest(path, "sha256")


def file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    """Hex digest (``algorithm``: a hashlib name) of a file, read in 1 MiB blocks; md5 only
    as a checksum against a published release, never for security."""
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """What a finished (or checked) shard file holds, without its pixels."""

    path: Path
    sha256: str
    kind: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_samples: dict[str, int]
    class_counts: dict[str, tuple[int, ...]]
    stats: dict[str, PixelStats] = field(default_factory=dict)
    #: segmentation shards: label-map pixels per class, per split (else None)
    pixel_class_counts: dict[str, tuple[int, ...]] | None = None
    #: segmentation shards: sha256 of each split's label maps (uint8, row order), as
    #: ``check_shard`` computes it (else None)
    mask_sha256: dict[str, str] | None = None


@dataclass(frozen=True)
class SplitData:
    """One split of a shard, loaded into memory."""

    images: np.ndarray
    labels: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    class_counts: np.ndarray


@dataclass(frozen=True)
class Shard:
    """A whole shard file loaded into memory (see :func:`read_shard`)."""

    path: Path
    kind: str
    num_classes: int
    image_shape: tuple[int, int, int]
    attrs: dict[str, Any]
    splits: dict[str, SplitData]

    @property
    def site(self) -> int | None:
        return self.attrs.get("site")


class _SplitState:
    def __init__(self, group: h5py.Group, image_shape: tuple[int, int, int], num_classes: int,
                 compressor: "_Compressor", *, masks: bool = False) -> None:
        image_bytes = int(np.prod(image_shape))
        chunk_n = max(1, min(CHUNK_IMAGES, _CHUNK_BYTES // image_bytes))
        self.chunk_n = chunk_n
        self.image_shape = image_shape
        self.compressor = compressor
        #: images after the last full chunk, waiting for the rest of theirs
        self.pending = np.empty((0, *image_shape), dtype=np.uint8)
        self.chunks_written = 0
        self.group = group
        self.images = group.create_dataset(
            "images", shape=(0, *image_shape), maxshape=(None, *image_shape),
            chunks=(chunk_n, *image_shape), dtype=np.uint8, compression="gzip",
            compression_opts=_GZIP_LEVEL, shuffle=True, track_times=False,
        )
        self.labels = group.create_dataset(
            "labels", shape=(0,), maxshape=(None,), chunks=(_LABEL_CHUNK,), dtype=np.int64,
            compression="gzip", compression_opts=_GZIP_LEVEL, shuffle=True, track_times=False,
        )
        self.masks: h5py.Dataset | None = None
        self.pixel_class_counts = np.zeros(num_classes, dtype=np.int64)
        if masks:
            tile = (1, min(MASK_TILE, image_shape[1]), min(MASK_TILE, image_shape[2]))
            self.masks = group.create_dataset(
                "masks", shape=(0, *image_shape[1:]), maxshape=(None, *image_shape[1:]),
                chunks=tile, dtype=np.uint8, compression="gzip", compression_opts=_GZIP_LEVEL,
                shuffle=True, track_times=False,
            )
        self.count = 0
        self.class_counts = np.zeros(num_classes, dtype=np.int64)
        self.stats = RunningStats(image_shape[0])

    def append(self, images: np.ndarray, labels: np.ndarray,
               masks: np.ndarray | None = None) -> None:
        n = len(labels)
        if n == 0:
            return
        self.images.resize(self.count + n, axis=0)
        self.labels.resize(self.count + n, axis=0)
        self.labels[self.count :] = labels
        if self.masks is not None and masks is not None:
            self.masks.resize(self.count + n, axis=0)
            self.masks[self.count :] = masks
            self.pixel_class_counts += np.bincount(
                masks.reshape(-1), minlength=len(self.pixel_class_counts))[
                    : len(self.pixel_class_counts)]
        self._write_images(images)
        self.count += n
        self.class_counts += np.bincount(labels, minlength=len(self.class_counts))
        self.stats.update(images)

    def _write_images(self, images: np.ndarray) -> None:
        """Write every chunk these images complete; keep the rest for the next call."""
        blocks: list[np.ndarray] = []
        start = 0
        if len(self.pending):
            start = min(len(images), self.chunk_n - len(self.pending))
            self.pending = np.concatenate([self.pending, images[:start]])
            if len(self.pending) == self.chunk_n:
                blocks.append(self.pending)
                self.pending = self.pending[:0]
        full = start + (len(images) - start) // self.chunk_n * self.chunk_n
        blocks += [images[i : i + self.chunk_n] for i in range(start, full, self.chunk_n)]
        if full < len(images):
            self.pending = images[full:].copy()
        self._write_blocks(blocks)

    def _write_blocks(self, blocks: list[np.ndarray]) -> None:
        for data in self.compressor.compress(blocks):
            offset = (self.chunks_written * self.chunk_n, 0, 0, 0)
            self.images.id.write_direct_chunk(offset, data)
            self.chunks_written += 1

    def finish(self) -> PixelStats:
        if len(self.pending):
            # an edge chunk is stored whole, padded with the fill value (0), as HDF5 does
            block = np.zeros((self.chunk_n, *self.image_shape), dtype=np.uint8)
            block[: len(self.pending)] = self.pending
            self._write_blocks([block])
            self.pending = self.pending[:0]
        stats = self.stats.result()
        attrs = self.group.attrs
        attrs["num_samples"] = self.count
        attrs["class_counts"] = self.class_counts
        attrs["pixel_count"] = np.asarray(stats.pixel_count, dtype=np.int64)
        attrs["pixel_sum"] = np.asarray(stats.pixel_sum, dtype=np.float64)
        attrs["pixel_sumsq"] = np.asarray(stats.pixel_sumsq, dtype=np.float64)
        attrs["mean"] = np.asarray(stats.mean, dtype=np.float64)
        attrs["std"] = np.asarray(stats.std, dtype=np.float64)
        if self.masks is not None:
            attrs["pixel_class_counts"] = self.pixel_class_counts
        return stats


class _Compressor:
    """zlib at the shard level, in order, on ``threads`` threads."""

    def __init__(self, threads: int) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise DataError(f"threads must be a positive integer, got {threads!r}")
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def compress(self, blocks: list[np.ndarray]) -> list[bytes]:
        if self._pool is None or len(blocks) < 2:
            return [_deflate(b) for b in blocks]
        return list(self._pool.map(_deflate, blocks))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _deflate(block: np.ndarray) -> bytes:
    return zlib.compress(np.ascontiguousarray(block).data.cast("B"), _GZIP_LEVEL)


class ShardWriter:
    """Streams images into a new shard file; the file appears only on a clean close.

    ``threads`` compress the image chunks in parallel; the file is the same for any number.
    ``masks``: a segmentation shard; every :meth:`append` then brings a label map per image.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with ShardWriter(d / "s.h5", kind="test", image_shape=(1, 2, 2), num_classes=2) as w:
    ...     w.append("test", np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 1, 1]))
    >>> w.info.num_samples, w.info.class_counts
    ({'test': 3}, {'test': (1, 2)})
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        kind: str,
        image_shape: tuple[int, int, int] | list[int],
        num_classes: int,
        attrs: Mapping[str, Any] | None = None,
        threads: int = 1,
        masks: bool = False,
    ) -> None:
        if kind not in SPLITS_BY_KIND:
            raise DataError(f"shard kind must be one of {sorted(SPLITS_BY_KIND)}, got {kind!r}")
        shape = tuple(int(v) for v in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"image_shape must be [C, H, W] of positive sizes, got {image_shape!r}")
        if int(num_classes) < 1:
            raise DataError(f"num_classes must be at least 1, got {num_classes}")
        extra = dict(attrs or {})
        clash = sorted(set(extra) & set(RESERVED_ATTRS))
        if clash:
            raise DataError(f"shard attrs may not override format attributes {clash}")
        self.path = Path(path)
        self.kind = kind
        self.image_shape: tuple[int, int, int] = (shape[0], shape[1], shape[2])
        self.num_classes = int(num_classes)
        self.with_masks = bool(masks)
        if self.with_masks and int(num_classes) > 256:
            raise DataError(f"a uint8 label map holds at most 256 classes, got {num_classes}")
        self._compressor = _Compressor(threads)
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            self._file: h5py.File | None = h5py.File(self._tmp, "w-")
        except OSError as exc:
            raise ShardError(f"cannot create shard file {self.path}: {exc}") from exc
        try:
            root = self._file.attrs
            root["fedsilo_format"] = FORMAT_VERSION
            root["kind"] = kind
            root["num_classes"] = self.num_classes
            root["image_shape"] = np.asarray(shape, dtype=np.int64)
            for key, value in extra.items():
                root[key] = value
            if self.with_masks:
                root["task"] = "segmentation"
        except Exception:
            self.abort()
            raise
        self._splits: dict[str, _SplitState] = {}
        self._info: ShardInfo | None = None

    def append(self, split: str, images: np.ndarray, labels: np.ndarray,
               masks: np.ndarray | None = None) -> None:
        """Add a batch of images (uint8, N x C x H x W) and labels (N integers), and for a
        segmentation shard their label maps (``masks``: uint8 N x H x W)."""
        if self._file is None:
            raise ShardError(f"shard writer for {self.path} is already closed")
        allowed = SPLITS_BY_KIND[self.kind]
        if split not in allowed:
            raise DataError(
                f"{self.path}: a {self.kind} shard holds splits {list(allowed)}, not {split!r}"
            )
        images, labels = self._validate(split, images, labels)
        masks = self._validate_masks(split, masks, len(labels))
        if split not in self._splits:
            group = self._file.create_group(split)
            self._splits[split] = _SplitState(group, self.image_shape, self.num_classes,
                                              self._compressor, masks=self.with_masks)
        self._splits[split].append(images, labels, masks)

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Add root attributes known only after the data (e.g. the inputs a writer skipped)."""
        if self._file is None:
            raise ShardError(f"shard writer for {self.path} is already closed")
        clash = sorted(set(attrs) & set(RESERVED_ATTRS))
        if clash:
            raise DataError(f"shard attrs may not override format attributes {clash}")
        for key, value in attrs.items():
            self._file.attrs[key] = value

    def close(self) -> ShardInfo:
        """Finish the file, move it onto ``path`` and return what it holds."""
        if self._info is not None:
            return self._info
        if self._file is None:
            raise ShardError(f"shard writer for {self.path} was aborted")
        try:
            stats: dict[str, PixelStats] = {}
            for split in SPLITS_BY_KIND[self.kind]:
                if split not in self._splits:  # every split exists, if only empty
                    group = self._file.create_group(split)
                    self._splits[split] = _SplitState(group, self.image_shape, self.num_classes,
                                                      self._compressor, masks=self.with_masks)
                stats[split] = self._splits[split].finish()
            self._compressor.close()
            self._file.close()
            self._file = None
            _fsync(self._tmp)
            digest = sha256_file(self._tmp)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._info = ShardInfo(
            path=self.path,
            sha256=digest,
            kind=self.kind,
            num_classes=self.num_classes,
            image_shape=self.image_shape,
            num_samples={s: st.count for s, st in self._splits.items()},
            class_counts={
                s: tuple(int(v) for v in st.class_counts) for s, st in self._splits.items()
            },
            stats=stats,
            pixel_class_counts={
                s: tuple(int(v) for v in st.pixel_class_counts) for s, st in self._splits.items()
            } if self.with_masks else None,
        )
        return self._info

    def abort(self) -> None:
        """Drop the partial file; ``path`` is left as it was."""
        self._compressor.close()
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # the temp file is about to be deleted anyway
                pass
            self._file = None
        self._tmp.unlink(missing_ok=True)

    @property
    def info(self) -> ShardInfo:
        if self._info is None:
            raise ShardError(f"shard {self.path} is not finished yet")
        return self._info

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _validate(
        self, split: str, images: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        where = f"{self.path} [{split}]"
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8:
            raise DataError(f"{where}: images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise DataError(
                f"{where}: images must have shape (N, {', '.join(map(str, self.image_shape))}), "
                f"got {images.shape}"
            )
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
            raise DataError(
                f"{where}: labels must be a 1-D integer array, got shape {labels.shape} "
                f"dtype {labels.dtype}"
            )
        if len(labels) != len(images):
            raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
        labels = labels.astype(np.int64, copy=False)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0]
            raise DataError(
                f"{where}: label {int(bad)} is outside [0, {self.num_classes}) "
                f"(num_classes={self.num_classes})"
            )
        return np.ascontiguousarray(images), labels

    def _validate_masks(self, split: str, masks: np.ndarray | None, count: int
                        ) -> np.ndarray | None:
        where = f"{self.path} [{split}]"
        if not self.with_masks:
            if masks is not None:
                raise DataError(f"{where}: masks given to a shard written without masks=True")
            return None
        if masks is None:
            raise DataError(f"{where}: a segmentation shard needs a label map per image")
        masks = np.asarray(masks)
        if masks.dtype != np.uint8 or masks.shape != (count, *self.image_shape[1:]):
            raise DataError(f"{where}: masks must be uint8 of shape ({count}, "
                            f"{self.image_shape[1]}, {self.image_shape[2]}), got {masks.dtype} "
                            f"{masks.shape}")
        if masks.size and int(masks.max()) >= self.num_classes:
            raise DataError(f"{where}: label value {int(masks.max())} is outside [0, "
                            f"{self.num_classes}) (num_classes={self.num_classes})")
        return np.ascontiguousarray(masks)


def write_shard(
    path: str | os.PathLike[str],
    *,
    kind: str,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    attrs: Mapping[str, Any] | None = None,
) -> ShardInfo:
    """Write a whole shard from in-memory ``{split: (images, labels)}`` arrays."""
    if not splits:
        raise DataError(f"{path}: no splits to write")
    image_shape = np.asarray(next(iter(splits.values()))[0]).shape[1:]
    with ShardWriter(
        path, kind=kind, image_shape=image_shape, num_classes=num_classes, attrs=attrs
    ) as writer:
        for split, (images, labels) in splits.items():
            writer.append(split, images, labels)
    return writer.info


def read_shard(
    path: str | os.PathLike[str], *, splits: Sequence[str] | None = None
) -> Shard:
    """Load a shard file (all splits, or those named) into memory."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            root = {k: to_python(v) for k, v in f.attrs.items()}
            if root.get("fedsilo_format") != FORMAT_VERSION:
                raise ShardError(
                    f"{path}: unsupported fedsilo_format {root.get('fedsilo_format')!r} "
                    f"(this fedsilo reads {FORMAT_VERSION})"
                )
            names = list(splits) if splits is not None else sorted(
                k for k in f.keys() if isinstance(f[k], h5py.Group)
            )
            loaded: dict[str, SplitData] = {}
            for name in names:
                if name not in f:
                    raise ShardError(f"{path}: no split {name!r} (has {sorted(f.keys())})")
                g = f[name]
                loaded[name] = SplitData(
                    images=g["images"][()],
                    labels=g["labels"][()].astype(np.int64, copy=False),
                    mean=np.asarray(g.attrs["mean"], dtype=np.float64),
                    std=np.asarray(g.attrs["std"], dtype=np.float64),
                    class_counts=np.asarray(g.attrs["class_counts"], dtype=np.int64),
                )
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ShardError(f"{path}: cannot read shard: {exc}") from exc
    return Shard(
        path=path,
        kind=str(root["kind"]),
        num_classes=int(root["num_classes"]),
        image_shape=tuple(int(v) for v in root["image_shape"]),  # type: ignore[arg-type]
        attrs={k: v for k, v in root.items() if k not in RESERVED_ATTRS},
        splits=loaded,
    )


def read_shard_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The root attributes of a shard file, as plain Python, without reading any pixels."""
    with h5py.File(path, "r") as f:
        return {key: to_python(value) for key, value in f.attrs.items()}


def read_split_attrs(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Each split's attributes (counts, pixel statistics), as plain Python, without pixels."""
    try:
        with h5py.File(path, "r") as f:
            return {
                name: {key: to_python(value) for key, value in f[name].attrs.items()}
                for name in sorted(f.keys())
                if isinstance(f[name], h5py.Group)
            }
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ShardError(f"{path}: cannot read shard: {exc}") from exc


def to_python(value: Any) -> Any:
    """HDF5 attribute value as plain Python (lists, ints, floats, str)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OSU":
            return [to_python(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
