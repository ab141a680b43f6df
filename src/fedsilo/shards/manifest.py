"""``manifest.json``: what a shard set holds and how it was made.

The manifest records, for every shard file, its sha256 and per-split sample and class
counts, plus the source, partition, seed, image shape and the global normalization
(combined from the sites' per-split pixel sums, so no pixels are read twice).  Sources
that name their classes (image folders, label files) add ``class_names``; a preparation
run with ``--skip-bad`` adds ``skipped``, the inputs it left out and why.  It is
written last and atomically, so a directory with a manifest is a complete shard set.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedsilo import __version__
from fedsilo.errors import ShardError
from fedsilo.shards.hdf5 import ShardInfo
from fedsilo.shards.stats import combine

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "fedsilo-shards"
MANIFEST_VERSION = 1
TEST_FILE = "test.h5"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def site_file_name(site: int) -> str:
    """File name of site ``site``'s shard: ``site-000.h5``, ``site-001.h5``, ..."""
    return f"site-{site:03d}.h5"


@dataclass(frozen=True)
class SiteEntry:
    """One shard file as the manifest records it."""

    file: str
    sha256: str
    num_samples: dict[str, int]
    class_counts: dict[str, tuple[int, ...]]

    @classmethod
    def from_info(cls, info: ShardInfo) -> "SiteEntry":
        return cls(
            file=info.path.name,
            sha256=info.sha256,
            num_samples=dict(info.num_samples),
            class_counts={k: tuple(v) for k, v in info.class_counts.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "num_samples": dict(self.num_samples),
            "class_counts": {k: list(v) for k, v in self.class_counts.items()},
        }


@dataclass(frozen=True)
class Manifest:
    """Contents of ``manifest.json`` (see :func:`load_manifest`)."""

    num_sites: int
    num_classes: int
    image_shape: tuple[int, int, int]
    partition: str
    seed: int
    source: dict[str, Any]
    normalization_mean: tuple[float, ...]
    normalization_std: tuple[float, ...]
    sites: tuple[SiteEntry, ...]
    test: SiteEntry
    class_names: tuple[str, ...] | None = None
    #: inputs left out by ``--skip-bad``: ``{"path": ..., "reason": ...}`` each
    skipped: tuple[dict[str, str], ...] | None = None
    created_by: str = field(default=f"fedsilo {__version__}")
    format_version: int = MANIFEST_VERSION
    #: ``classification`` or ``segmentation`` (image/mask pairs; docs/segmentation.md)
    task: str = "classification"
    #: segmentation: ``pixel_class_counts`` ({file: {split: [per class]}}), ``image_size``
    #: [H, W], ``groups`` ({file: {split: [group of each image]}}), ``pairs`` (the source
    #: files, each with its sha256) and ``mask_sha256`` ({file: {split: sha256 of the
    #: split's label maps as stored}}, checked by ``prep verify``)
    segmentation: dict[str, Any] | None = None

    def path_of(self, entry: SiteEntry, directory: str | os.PathLike[str]) -> Path:
        return Path(directory) / entry.file

    def record(self) -> dict[str, Any]:
        """What identifies this shard set across a run (kept in every coordinator
        checkpoint): classes, image shape, the test shard's and each site's sha256."""
        return {"num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "test": self.test.sha256, "sites": [e.sha256 for e in self.sites]}

    def site_path(self, directory: str | os.PathLike[str], site: int) -> Path:
        return self.path_of(self.sites[site], directory)

    def test_path(self, directory: str | os.PathLike[str]) -> Path:
        return self.path_of(self.test, directory)

    def total_samples(self, split: str) -> int:
        """Samples of ``split`` summed over all shards (sites and test)."""
        return sum(e.num_samples.get(split, 0) for e in (*self.sites, self.test))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "source": dict(self.source),
            "partition": self.partition,
            "seed": self.seed,
            "num_sites": self.num_sites,
            "num_classes": self.num_classes,
            **({} if self.class_names is None else {"class_names": list(self.class_names)}),
            "image_shape": list(self.image_shape),
            "normalization": {
                "mean": list(self.normalization_mean),
                "std": list(self.normalization_std),
            },
            "sites": [s.to_dict() for s in self.sites],
            "test": self.test.to_dict(),
        }
        if self.skipped is not None:
            data["skipped"] = [dict(item) for item in self.skipped]
        if self.task != "classification":
            data["task"] = self.task
        if self.segmentation is not None:
            data["segmentation"] = self.segmentation
        return data

    @classmethod
    def from_dict(cls, data: Any, *, where: str = MANIFEST_FILE) -> "Manifest":
        """Parse and validate a manifest's JSON object; ShardError names what is wrong."""
        return _parse(data, where)


def build_manifest(
    *,
    sites: Sequence[ShardInfo],
    test: ShardInfo,
    source: Mapping[str, Any],
    partition: str,
    seed: int,
    class_names: Sequence[str] | None = None,
    skipped: Sequence[Mapping[str, str]] | None = None,
) -> Manifest:
    """Manifest for freshly written shards; normalization from the sites' train sums."""
    if not sites:
        raise ShardError("a shard set needs at least one site")
    norm = combine(info.stats["train"] for info in sites)
    return Manifest(
        num_sites=len(sites),
        num_classes=test.num_classes,
        image_shape=test.image_shape,
        partition=partition,
        seed=int(seed),
        source=dict(source),
        normalization_mean=norm.mean,
        normalization_std=norm.std,
        sites=tuple(SiteEntry.from_info(info) for info in sites),
        test=SiteEntry.from_info(test),
        class_names=None if class_names is None else tuple(str(c) for c in class_names),
        skipped=None if skipped is None else tuple(
            {"path": str(item["path"]), "reason": str(item["reason"])} for item in skipped
        ),
    )


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``directory/manifest.json`` atomically (temporary file, then rename)."""
    path = Path(directory) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest.to_dict(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


#: the largest images and label sets a shard set may declare: every rank builds its model
#: and buffers from these figures before reading any shard, so a corrupt or hostile
#: manifest must not make it allocate terabytes (a 4096 x 4096 RGB image is 50M values)
MAX_IMAGE_VALUES, MAX_IMAGE_SIDE, MAX_CHANNELS, MAX_CLASSES = 1 << 26, 1 << 16, 1024, 100_000


def image_shape_problem(shape: Sequence[int], num_classes: int) -> str | None:
    """Why ``shape`` (C, H, W) and ``num_classes`` are beyond what fedsilo accepts, or None.

    >>> image_shape_problem([1, 100000, 100000], 2)
    "'image_shape' [1, 100000, 100000] is beyond the largest image fedsilo accepts (sides up..."
    >>> image_shape_problem([3, 224, 224], 1000) is None
    True
    """
    c, h, w = (int(v) for v in shape)
    if c > MAX_CHANNELS or h > MAX_IMAGE_SIDE or w > MAX_IMAGE_SIDE \
            or c * h * w > MAX_IMAGE_VALUES:
        return (f"'image_shape' {[c, h, w]} is beyond the largest image fedsilo accepts (sides "
                f"up to {MAX_IMAGE_SIDE}, at most {MAX_IMAGE_VALUES} values per image)")
    if num_classes > MAX_CLASSES:
        return f"'num_classes' {num_classes} is beyond the {MAX_CLASSES} fedsilo accepts"
    return None


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate the manifest of a shard set (a directory, or the file itself)."""
    path = Path(directory)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise ShardError(f"no shard-set manifest at {path} (run 'fedsilo prep' to make one)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardError(f"cannot read manifest {path}: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # not JSON, an int too long, nested too deep
        raise ShardError(f"manifest {path} is not valid JSON: {exc or 'nested too deep'}") \
            from None
    return _parse(data, str(path))


# --- validation -------------------------------------------------------------------------


def _parse(data: Any, where: str) -> Manifest:
    def fail(what: str) -> ShardError:
        return ShardError(f"manifest {where}: {what}")

    def get(obj: Any, key: str, kind: type | tuple[type, ...], label: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise fail(f"missing {label!r}")
        value = obj[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise fail(f"{label!r} has the wrong type ({type(value).__name__})")
        return value

    if not isinstance(data, dict):
        raise fail("top level is not a JSON object")
    if data.get("format") != MANIFEST_FORMAT:
        raise fail(f"'format' is {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    version = get(data, "format_version", int, "format_version")
    if version != MANIFEST_VERSION:
        raise fail(f"unsupported format_version {version} (this fedsilo reads {MANIFEST_VERSION})")
    num_sites = get(data, "num_sites", int, "num_sites")
    num_classes = get(data, "num_classes", int, "num_classes")
    if num_sites < 1 or num_classes < 1:
        raise fail("num_sites and num_classes must be positive")
    shape = get(data, "image_shape", list, "image_shape")
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise fail(f"'image_shape' must be [C, H, W] of positive integers, got {shape}")
    problem = image_shape_problem(shape, num_classes)
    if problem:
        raise fail(problem)
    norm = get(data, "normalization", dict, "normalization")
    mean = get(norm, "mean", list, "normalization.mean")
    std = get(norm, "std", list, "normalization.std")
    for label, values in (("normalization.mean", mean), ("normalization.std", std)):
        if len(values) != shape[0] or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise fail(f"{label!r} must hold {shape[0]} numbers (one per channel)")
    raw_sites = get(data, "sites", list, "sites")
    if len(raw_sites) != num_sites:
        raise fail(f"'num_sites' is {num_sites} but 'sites' lists {len(raw_sites)} files")
    sites = tuple(
        _parse_entry(entry, f"sites[{i}]", num_classes, fail, splits=("train", "val"))
        for i, entry in enumerate(raw_sites)
    )
    test = _parse_entry(get(data, "test", dict, "test"), "test", num_classes, fail,
                        splits=("test",))
    files = [e.file for e in (*sites, test)]
    if len(set(files)) != len(files):
        raise fail(f"shard file names repeat: {files}")
    class_names = data.get("class_names")
    if class_names is not None and (
        not isinstance(class_names, list)
        or len(class_names) != num_classes
        or not all(isinstance(c, str) for c in class_names)
    ):
        raise fail(f"'class_names' must be a list of {num_classes} strings")
    skipped = data.get("skipped")
    if skipped is not None and (
        not isinstance(skipped, list)
        or not all(
            isinstance(item, dict) and isinstance(item.get("path"), str)
            and isinstance(item.get("reason"), str) for item in skipped
        )
    ):
        raise fail("'skipped' must be a list of {\"path\": ..., \"reason\": ...} objects")
    task = data.get("task", "classification")
    if task not in ("classification", "segmentation"):
        raise fail(f"'task' is {task!r}, expected 'classification' or 'segmentation'")
    segmentation = data.get("segmentation")
    if task == "segmentation":
        _check_segmentation(segmentation, num_classes, (*sites, test), fail)
    elif segmentation is not None:
        raise fail("'segmentation' is given but 'task' is not 'segmentation'")
    return Manifest(
        num_sites=num_sites,
        num_classes=num_classes,
        image_shape=(shape[0], shape[1], shape[2]),
        partition=str(get(data, "partition", str, "partition")),
        seed=get(data, "seed", int, "seed"),
        source=dict(get(data, "source", dict, "source")),
        normalization_mean=tuple(float(v) for v in mean),
        normalization_std=tuple(float(v) for v in std),
        sites=sites,
        test=test,
        class_names=None if class_names is None else tuple(class_names),
        skipped=None if skipped is None else tuple(
            {"path": item["path"], "reason": item["reason"]} for item in skipped
        ),
        created_by=str(data.get("created_by", "")),
        format_version=version,
        task=task,
        segmentation=segmentation,
    )


def _check_segmentation(section: Any, num_classes: int, entries: Sequence[SiteEntry],
                        fail: Any) -> None:
    """A segmentation manifest's own section: per file and split, one pixel count per class."""
    if not isinstance(section, dict) or not isinstance(section.get("pixel_class_counts"), dict):
        raise fail("a segmentation manifest needs 'segmentation.pixel_class_counts'")
    if num_classes > 256:
        raise fail(f"'num_classes' {num_classes} is beyond a uint8 label map's 256")
    counts = section["pixel_class_counts"]
    for entry in entries:
        per_split = counts.get(entry.file)
        if not isinstance(per_split, dict) or set(per_split) != set(entry.num_samples):
            raise fail(f"'segmentation.pixel_class_counts.{entry.file}' must give each split "
                       f"of the file ({sorted(entry.num_samples)})")
        for split, hist in per_split.items():
            if not isinstance(hist, list) or len(hist) != num_classes or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in hist):
                raise fail(f"'segmentation.pixel_class_counts.{entry.file}.{split}' must be "
                           f"{num_classes} non-negative integers")
    digests = section.get("mask_sha256")
    if digests is not None:
        for entry in entries:
            per_split = digests.get(entry.file) if isinstance(digests, dict) else None
            if not isinstance(per_split, dict) or set(per_split) != set(entry.num_samples) \
                    or not all(isinstance(v, str) and _SHA256.match(v)
                               for v in per_split.values()):
                raise fail(f"'segmentation.mask_sha256.{entry.file}' must give each split of "
                           f"the file ({sorted(entry.num_samples)}) a sha256 of 64 lowercase "
                           f"hex digits")
    size = section.get("image_size")
    if size is not None and (not isinstance(size, list) or len(size) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise fail("'segmentation.image_size' must be [H, W] of positive integers")


def _parse_entry(entry: Any, label: str, num_classes: int, fail: Any, *,
                 splits: tuple[str, ...] = ()) -> SiteEntry:
    if not isinstance(entry, dict):
        raise fail(f"{label!r} is not an object")
    file = entry.get("file")
    # a bare file name: a manifest must not point outside its own directory
    if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
        raise fail(f"'{label}.file' must be a plain file name, got {file!r}")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise fail(f"'{label}.sha256' must be 64 lowercase hex digits, got {sha!r}")
    samples = entry.get("num_samples")
    counts = entry.get("class_counts")
    if not isinstance(samples, dict) or not isinstance(counts, dict) or not samples:
        raise fail(f"'{label}' needs 'num_samples' and 'class_counts' objects keyed by split")
    for split, n in samples.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise fail(f"'{label}.num_samples.{split}' must be a non-negative integer, got {n!r}")
        hist = counts.get(split)
        if (
            not isinstance(hist, list)
            or len(hist) != num_classes
            or not all(isinstance(v, int) and v >= 0 for v in hist)
        ):
            raise fail(
                f"'{label}.class_counts.{split}' must be {num_classes} non-negative integers"
            )
        if sum(hist) != n:
            raise fail(f"'{label}.class_counts.{split}' sums to {sum(hist)}, not num_samples {n}")
    if set(counts) != set(samples):
        raise fail(f"'{label}': num_samples and class_counts name different splits")
    missing = [split for split in splits if split not in samples]
    if missing:
        raise fail(f"'{label}' lists no {' or '.join(repr(s) for s in missing)} split "
                   f"(a {'test' if label == 'test' else 'site'} shard holds {list(splits)})")
    return SiteEntry(
        file=file,
        sha256=sha,
        num_samples=dict(samples),
        class_counts={k: tuple(v) for k, v in counts.items()},
    )
