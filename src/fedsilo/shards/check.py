"""Up-front validation of one shard file, run before any training starts.

Every problem becomes a :class:`ShardError` whose message names the file and the cause,
so a rank with a bad shard can stop the whole job with one clear line.  Pixel and label
data are scanned block by block, never loaded whole.  In a segmentation shard the label
maps are scanned too: their shape against the images', every value a class, their pixel
counts per class against the split's ``pixel_class_counts``, and their sha256 (what the
manifest records, ``verify.py``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from fedsilo.errors import ShardError
from fedsilo.shards.hdf5 import FORMAT_VERSION, SPLITS_BY_KIND, ShardInfo, sha256_file
from fedsilo.shards.manifest import image_shape_problem
from fedsilo.shards.masks import mask_problem
from fedsilo.shards.stats import PixelStats

#: HDF5 chunks read per block while scanning
_CHUNKS_PER_BLOCK = 16
#: label-map bytes read per block while scanning masks
_MASK_BLOCK_BYTES = 16 << 20
_STATS_ATTRS = ("pixel_count", "pixel_sum", "pixel_sumsq")


def check_shard(
    path: str | os.PathLike[str],
    *,
    kind: str,
    expected_sha256: str | None = None,
    image_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    required_splits: Sequence[str] | None = None,
    task: str | None = None,
) -> ShardInfo:
    """Validate a shard file and return what it holds; raise ShardError if it is unusable.
    ``task``: the task the file must be for (classification or segmentation)."""
    path = Path(path)
    if kind not in SPLITS_BY_KIND:
        raise ShardError(f"{path}: cannot check for unknown shard kind {kind!r}")
    if not path.exists():
        raise ShardError(f"shard file not found: {path}")
    if not path.is_file():
        raise ShardError(f"{path}: is not a regular file")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read file: {exc}") from exc
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ShardError(
            f"{path}: sha256 mismatch: expected {expected_sha256[:12]}..., file has "
            f"{digest[:12]}... (changed or corrupted since the manifest was written)"
        )
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ShardError(
            f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}"
        ) from exc
    with handle as f:
        try:
            return _check_open(
                f, path, digest, kind=kind, image_shape=image_shape,
                num_classes=num_classes, required_splits=required_splits, task=task,
            )
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise ShardError(f"{path}: corrupt shard, reading failed: {exc}") from exc


def _check_open(
    f: h5py.File,
    path: Path,
    digest: str,
    *,
    kind: str,
    image_shape: Sequence[int] | None,
    num_classes: int | None,
    required_splits: Sequence[str] | None,
    task: str | None = None,
) -> ShardInfo:
    attrs = f.attrs
    if "fedsilo_format" not in attrs:
        raise ShardError(f"{path}: not a fedsilo shard (no 'fedsilo_format' attribute)")
    version = int(attrs["fedsilo_format"])
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: unsupported fedsilo_format {version} (this fedsilo reads {FORMAT_VERSION})"
        )
    for key in ("kind", "num_classes", "image_shape"):
        if key not in attrs:
            raise ShardError(f"{path}: missing root attribute {key!r}")
    file_kind = attrs["kind"]
    file_kind = file_kind.decode() if isinstance(file_kind, bytes) else str(file_kind)
    if file_kind != kind:
        raise ShardError(f"{path}: is a {file_kind!r} shard, expected a {kind!r} shard")
    file_classes = int(attrs["num_classes"])
    if num_classes is not None and file_classes != int(num_classes):
        raise ShardError(
            f"{path}: num_classes is {file_classes} in the file but {num_classes} was expected"
        )
    dims = tuple(int(v) for v in np.asarray(attrs["image_shape"]).ravel())
    if len(dims) != 3 or min(dims) < 1:
        raise ShardError(f"{path}: image_shape attribute is {list(dims)}, not [C, H, W] of "
                         f"positive sizes; the file is not a fedsilo shard")
    file_shape = (dims[0], dims[1], dims[2])
    problem = image_shape_problem(file_shape, max(int(file_classes), 1))
    if problem:
        raise ShardError(f"{path}: {problem}")
    if image_shape is not None and file_shape != tuple(int(v) for v in image_shape):
        raise ShardError(
            f"{path}: image shape is {_fmt_shape(file_shape)} but "
            f"{_fmt_shape(image_shape)} was expected"
        )

    file_task = attrs.get("task", "classification")
    file_task = file_task.decode() if isinstance(file_task, bytes) else str(file_task)
    if file_task not in ("classification", "segmentation"):
        raise ShardError(f"{path}: unknown task {file_task!r} (classification or segmentation)")
    if task is not None and file_task != task:
        raise ShardError(f"{path}: is a {file_task} shard, expected a {task} shard")

    splits = list(required_splits) if required_splits is not None else list(SPLITS_BY_KIND[kind])
    splits += sorted(k for k in f.keys() if k not in splits and isinstance(f[k], h5py.Group))
    num_samples: dict[str, int] = {}
    class_counts: dict[str, tuple[int, ...]] = {}
    stats: dict[str, PixelStats] = {}
    pixel_counts: dict[str, tuple[int, ...]] = {}
    mask_digests: dict[str, str] = {}
    for split in splits:
        n, counts, split_stats = _check_split(f, path, split, file_shape, file_classes)
        num_samples[split], class_counts[split], stats[split] = n, counts, split_stats
        if file_task == "segmentation":
            pixel_counts[split], mask_digests[split] = _check_masks(f, path, split)
    if num_samples.get("train", 1) == 0:
        raise ShardError(f"{path}: training split is empty (0 samples)")
    seg = file_task == "segmentation"
    return ShardInfo(
        path=path, sha256=digest, kind=kind, num_classes=file_classes,
        image_shape=file_shape, num_samples=num_samples, class_counts=class_counts, stats=stats,
        pixel_class_counts=pixel_counts if seg else None,
        mask_sha256=mask_digests if seg else None,
    )


def _check_masks(f: h5py.File, path: Path, split: str) -> tuple[tuple[int, ...], str]:
    """A segmentation split's label maps: shape, values and pixel counts; their sha256."""
    where = f"{path} [{split}]"
    problem, num_classes = mask_problem(f, split)
    if problem is not None:
        raise ShardError(f"{path}{' ' if problem.startswith('[') else ': '}{problem}")
    masks = f[split]["masks"]
    counts = np.zeros(num_classes, dtype=np.int64)
    digest = hashlib.sha256()
    step = max(1, _MASK_BLOCK_BYTES // max(1, int(masks.shape[1]) * int(masks.shape[2])))
    for start in range(0, int(masks.shape[0]), step):
        block = np.ascontiguousarray(masks[start: start + step])
        top = int(block.max()) if block.size else 0
        if top >= num_classes:
            raise ShardError(f"{where}: label value {top} in the masks is outside [0, "
                             f"{num_classes}) (num_classes={num_classes})")
        counts += np.bincount(block.ravel(), minlength=num_classes)
        digest.update(block.tobytes())
    stored = f[split].attrs.get("pixel_class_counts")
    if stored is None:
        raise ShardError(f"{where}: missing split attribute 'pixel_class_counts'")
    if np.asarray(stored).ravel().tolist() != counts.tolist():
        raise ShardError(f"{where}: pixel_class_counts attribute "
                         f"{np.asarray(stored).ravel().tolist()} disagrees with the masks "
                         f"{counts.tolist()}")
    return tuple(int(v) for v in counts), digest.hexdigest()


def _check_split(
    f: h5py.File, path: Path, split: str, shape: tuple[int, ...], num_classes: int
) -> tuple[int, tuple[int, ...], PixelStats]:
    where = f"{path} [{split}]"
    if split not in f or not isinstance(f[split], h5py.Group):
        raise ShardError(f"{path}: missing split group {split!r}")
    group = f[split]
    for name in ("images", "labels"):
        if name not in group or not isinstance(group[name], h5py.Dataset):
            raise ShardError(f"{where}: missing dataset {name!r}")
    images, labels = group["images"], group["labels"]
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise ShardError(
            f"{where}: images have shape {images.shape}, expected (N, {', '.join(map(str, shape))})"
        )
    is_float = np.issubdtype(images.dtype, np.floating)
    if images.dtype != np.uint8 and not is_float:
        raise ShardError(f"{where}: images have dtype {images.dtype}, expected uint8 or float")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ShardError(
            f"{where}: labels must be a 1-D integer dataset, got shape {labels.shape} "
            f"dtype {labels.dtype}"
        )
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ShardError(f"{where}: {n} images but {labels.shape[0]} labels")
    # the attributes first: a damaged header that declares 2**31 rows is named at once,
    # before any scan of the rows it claims
    attrs = group.attrs
    missing = [k for k in ("num_samples", "class_counts", *_STATS_ATTRS) if k not in attrs]
    if missing:
        raise ShardError(f"{where}: missing split attributes {missing}")
    if int(attrs["num_samples"]) != n:
        raise ShardError(
            f"{where}: num_samples attribute is {int(attrs['num_samples'])} but it holds {n}"
        )

    counts = np.zeros(num_classes, dtype=np.int64)
    for start, stop in _blocks(labels):
        block = labels[start:stop].astype(np.int64)
        bad = block[(block < 0) | (block >= num_classes)]
        if bad.size:
            raise ShardError(
                f"{where}: labels out of range [0, {num_classes}): found {int(bad[0])}"
            )
        counts += np.bincount(block, minlength=num_classes)
    if is_float:
        for start, stop in _blocks(images):
            if not np.isfinite(images[start:stop]).all():
                raise ShardError(f"{where}: non-finite pixel values (NaN or Inf) in images")

    if np.asarray(attrs["class_counts"]).tolist() != counts.tolist():
        raise ShardError(
            f"{where}: class_counts attribute {np.asarray(attrs['class_counts']).tolist()} "
            f"disagrees with the labels {counts.tolist()}"
        )
    split_stats = PixelStats(
        tuple(int(v) for v in np.asarray(attrs["pixel_count"]).ravel()),
        tuple(float(v) for v in np.asarray(attrs["pixel_sum"]).ravel()),
        tuple(float(v) for v in np.asarray(attrs["pixel_sumsq"]).ravel()),
    )
    return n, tuple(int(v) for v in counts), split_stats


def _blocks(dataset: h5py.Dataset) -> Iterator[tuple[int, int]]:
    """(start, stop) of each block of rows, lazily: a declared size costs no memory."""
    step = (dataset.chunks[0] if dataset.chunks else 256) * _CHUNKS_PER_BLOCK
    n = dataset.shape[0]
    return ((start, min(start + step, n)) for start in range(0, n, step))


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def check_listed_shard(manifest: Any, directory: str | os.PathLike[str], entry: Any, *,
                       kind: str, verify_hash: bool) -> ShardInfo:
    """Check the shard a manifest ``entry`` lists: the file (format, shape, classes, labels,
    pixels, and its sha256 with ``verify_hash``), and every figure the manifest gives for
    it, which the FedAvg weights come from.  No torch: a run does this before anything
    heavy is imported."""
    path = manifest.path_of(entry, directory)
    info = check_shard(path, kind=kind, expected_sha256=entry.sha256 if verify_hash else None,
                       image_shape=tuple(manifest.image_shape),
                       num_classes=manifest.num_classes, required_splits=SPLITS_BY_KIND[kind],
                       task=getattr(manifest, "task", None))
    for split, n in sorted(entry.num_samples.items()):
        real_n = info.num_samples.get(split)
        real_counts = tuple(info.class_counts.get(split, ()))
        if real_n != n or real_counts != tuple(entry.class_counts.get(split, ())):
            raise ShardError(
                f"{path}: the manifest says split {split!r} holds {n} samples with class counts "
                f"{list(entry.class_counts.get(split, ()))}, the shard holds {real_n} with "
                f"{list(real_counts)}; the manifest does not describe this shard (re-run "
                f"'fedsilo prep verify' or prepare the set again)")
    return info
