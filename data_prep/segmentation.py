"""``fedsilo prep segmentation``: image/mask pairs into segmentation shards.

Pairs come from a folder of images and a folder of masks, matched by name, or from a CSV
file of pairs.  A mask belongs to the image whose name stem is the longest one its own stem
starts with, followed by the end of the stem or a separator (``_ - .`` or a space): so
``Image_01L_1stHO.png`` is ``Image_01L.jpg``'s mask, never ``Image_01.jpg``'s, and the
order the files are listed in never matters.

Images that belong together (both eyes of one child, several slices of one patient) form
a *group*: taken from the name with ``--group-pattern`` (a regular expression; its first
parenthesized group, else the whole match) or from the CSV's ``group`` column.  Groups are
kept whole by every partition and hold-out (``grouping.py``): one patient never straddles
two sites, or a site and the test set.

Masks are label maps (``images.decode_mask``): 1-bit masks become 0/1, and with two
classes an 8-bit mask of only 0 and 255 is read as 0/1 too.  A pair whose mask is missing
or unreadable, whose sizes differ, whose image differs in size from the set's first, or
whose mask holds a value outside ``0..classes-1`` is an error naming the file, or, with
``--skip-bad``, left out and listed under ``skipped`` in the manifest.

Images may be DICOM files (``.dcm``, decoded as ``prep dicom`` does: modality LUT, the
header's window, MONOCHROME1 inverted) with their masks as PNG/TIFF files, in a folder of
masks or beside the images: with ``--masks`` the same folder as ``--images``, the ``.dcm``
files are the images and the other image files their masks (``CT_0001.dcm`` and
``CT_0001_mask.png``).

Every image of a set has the same size (no resizing: a resized label map is no longer the
annotation).  The pairs are decoded into memory once; a set of a few thousand 1-megapixel
pairs fits easily, far larger ones are not this tool's use yet.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedsilo.errors import ConfigError, DataError
from fedsilo.prep.grouping import group_holdout, group_partition, natural_partition
from fedsilo.prep.images import ImageDecoder, decode_mask
from fedsilo.prep.records import BadInput
from fedsilo.seeds import derive_seed
from fedsilo.shards import (
    MANIFEST_FILE,
    TEST_FILE,
    Manifest,
    ShardInfo,
    ShardWriter,
    build_manifest,
    site_file_name,
    write_manifest,
)

#: image and mask files a folder source lists
SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: DICOM images (their masks are image files)
DICOM_SUFFIXES = (".dcm", ".dicom")
#: what may follow an image's stem in its mask's stem
_SEPARATORS = "_-. "
#: the most rows a pairs CSV may have, and its largest size in bytes
MAX_CSV_ROWS, MAX_CSV_BYTES = 1_000_000, 256 << 20
#: hold-out streams (apart from the partition's own seed)
_TEST_STREAM, _VAL_STREAM = 11, 12


@dataclass(frozen=True)
class Pair:
    """One image, its mask (None: missing), its group and, from a CSV, its site."""

    image: Path
    mask: Path | None
    group: str
    site: str | None = None


def list_files(folder: Path, suffixes: Sequence[str] = SUFFIXES) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise ConfigError(f"no such folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def mask_owner(mask_stem: str, image_stems: Sequence[str]) -> str | None:
    """The image stem a mask stem belongs to: the longest that it starts with, followed by
    its end or a separator; None if there is none.

    >>> mask_owner("Image_01L_1stHO", ["Image_01", "Image_01L", "Image_01R"])
    'Image_01L'
    >>> mask_owner("img_10_mask", ["img_1"]) is None
    True
    """
    best = None
    for stem in image_stems:
        if mask_stem == stem or (mask_stem.startswith(stem)
                                 and mask_stem[len(stem)] in _SEPARATORS):
            if best is None or len(stem) > len(best):
                best = stem
    return best


def group_of(stem: str, pattern: str | None) -> str | None:
    """The group ``pattern`` finds in a name stem (no pattern: the stem itself).

    >>> group_of("Image_07R", r"Image_(\\d+)")
    '07'
    """
    if pattern is None:
        return stem
    found = re.search(pattern, stem)
    if found is None:
        return None
    return found.group(1) if found.groups() else found.group(0)


def pair_folders(images: Path, masks: Path, *, group_pattern: str | None = None
                 ) -> tuple[list[Pair], list[BadInput]]:
    """The pairs of an image folder and a mask folder, and the files that make no pair."""
    _check_pattern(group_pattern)
    beside = images.resolve() == masks.resolve()  # DICOM images with their masks beside them
    image_files = list_files(images, DICOM_SUFFIXES if beside else SUFFIXES + DICOM_SUFFIXES)
    if beside and not image_files:
        raise DataError(f"--masks is the --images folder {images}, which holds no DICOM "
                        f"image (.dcm): masks beside their images are for DICOM sets; give "
                        f"a folder of masks otherwise")
    by_stem: dict[str, Path] = {}
    bad: list[BadInput] = []
    for path in image_files:
        if path.stem in by_stem:
            bad.append(BadInput(str(path), f"two images share the name {path.stem!r} "
                                           f"({by_stem[path.stem].name})"))
            continue
        by_stem[path.stem] = path
    stems = sorted(by_stem)
    owned: dict[str, list[Path]] = {stem: [] for stem in stems}
    for mask in list_files(masks):
        owner = mask_owner(mask.stem, stems)
        if owner is None:
            bad.append(BadInput(str(mask), "this mask matches no image by name"))
        else:
            owned[owner].append(mask)
    pairs: list[Pair] = []
    for stem in stems:
        image = by_stem[stem]
        group = group_of(stem, group_pattern)
        if group is None:
            bad.append(BadInput(str(image), f"--group-pattern {group_pattern!r} finds no "
                                            f"group in the name"))
        elif len(owned[stem]) > 1:
            bad.append(BadInput(str(image), "several masks match this image: "
                                + ", ".join(m.name for m in owned[stem])))
        elif not owned[stem]:
            bad.append(BadInput(str(image), f"missing mask (none in {masks} matches)"))
        else:
            pairs.append(Pair(image, owned[stem][0], group))
    return pairs, bad


def pair_csv(path: Path, *, group_pattern: str | None = None) -> list[Pair]:
    """Pairs from a CSV file with columns ``image`` and ``mask`` (paths relative to the
    file's folder) and optionally ``group`` and ``site``."""
    _check_pattern(group_pattern)
    try:
        if path.stat().st_size > MAX_CSV_BYTES:
            raise DataError(f"{path}: larger than {MAX_CSV_BYTES >> 20} MiB")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read pairs file {path}: {exc}") from None
    if len(rows) > MAX_CSV_ROWS:
        raise DataError(f"{path}: more than {MAX_CSV_ROWS} rows")
    if not rows or not {"image", "mask"} <= set(rows[0]):
        raise DataError(f"{path}: needs a header with columns 'image' and 'mask' and at "
                        f"least one row")
    pairs = []
    for number, row in enumerate(rows, start=2):
        image, mask = (row.get("image") or "").strip(), (row.get("mask") or "").strip()
        if not image:
            raise DataError(f"{path} line {number}: empty 'image'")
        image_path = path.parent / image
        group = (row.get("group") or "").strip() or group_of(image_path.stem, group_pattern)
        if group is None:
            raise DataError(f"{path} line {number}: --group-pattern {group_pattern!r} finds "
                            f"no group in {image!r}")
        site = (row.get("site") or "").strip() or None
        pairs.append(Pair(image_path, path.parent / mask if mask else None, group, site))
    return pairs


@dataclass
class Decoded:
    """The pairs that decoded cleanly: images, label maps, their labels and groups."""

    pairs: list[Pair]
    images: np.ndarray
    masks: np.ndarray
    bad: list[BadInput]

    @property
    def labels(self) -> np.ndarray:
        """Each image's highest class present (what partitions stratify by)."""
        return self.masks.reshape(len(self.masks), -1).max(axis=1).astype(np.int64) \
            if len(self.masks) else np.zeros(0, np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([p.group for p in self.pairs], dtype=object)


def decode_pairs(pairs: Sequence[Pair], *, num_classes: int, channels: int | None,
                 size: tuple[int, int] | None = None) -> Decoded:
    """Decode every pair; those that cannot be used go to ``bad`` with the reason.
    ``size`` (H, W): the size every image must have (default: the first good image's)."""
    decoder = ImageDecoder(channels=channels)
    dicom: Any = None  # decoded as `prep dicom` does; pydicom loads only for a DICOM set
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    kept: list[Pair] = []
    bad: list[BadInput] = []
    for pair in pairs:
        if pair.mask is None or not pair.mask.is_file():
            bad.append(BadInput(str(pair.image), f"missing mask {pair.mask}"))
            continue
        if pair.image.suffix.lower() in DICOM_SUFFIXES:
            if dicom is None:
                from fedsilo.prep.dicom import DicomDecoder

                dicom = DicomDecoder(channels=channels)
            image = dicom(str(pair.image))
        else:
            image = decoder(str(pair.image))
        mask = decode_mask(str(pair.mask))
        problem = image if isinstance(image, BadInput) else \
            mask if isinstance(mask, BadInput) else None
        if problem is not None:
            bad.append(problem)
            continue
        assert isinstance(image, np.ndarray) and isinstance(mask, np.ndarray)
        if image.shape[1:] != mask.shape:
            bad.append(BadInput(str(pair.mask), f"size mismatch: mask {mask.shape[0]}x"
                                f"{mask.shape[1]}, image {image.shape[1]}x{image.shape[2]}"))
            continue
        if size is None:
            size = (image.shape[1], image.shape[2])
        if image.shape[1:] != size or (images and image.shape[0] != images[0].shape[0]):
            bad.append(BadInput(str(pair.image), f"image {'x'.join(map(str, image.shape))} "
                                f"differs from the set's {size[0]}x{size[1]} (images are "
                                f"not resized: the mask would no longer fit)"))
            continue
        values = np.unique(mask)
        if num_classes == 2 and set(values.tolist()) <= {0, 255}:
            mask = (mask == 255).astype(np.uint8)
            values = np.unique(mask)
        unknown = values[values >= num_classes]
        if unknown.size:
            bad.append(BadInput(str(pair.mask), f"unknown label values "
                                f"{unknown[:8].tolist()} (classes 0..{num_classes - 1})"))
            continue
        images.append(image)
        masks.append(mask)
        kept.append(pair)
    if not images:
        shape: tuple[int, ...] = (0, channels or 1, 1, 1)
        return Decoded(kept, np.zeros(shape, np.uint8), np.zeros((0, 1, 1), np.uint8), bad)
    return Decoded(kept, np.stack(images), np.stack(masks), bad)


def prepare_segmentation(
    pairs: Sequence[Pair],
    *,
    out: Path,
    sites: int | None,
    partition: str = "iid",
    seed: int = 0,
    num_classes: int = 2,
    class_names: Sequence[str] | None = None,
    channels: int | None = None,
    test_pairs: Sequence[Pair] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    skip_bad: bool = False,
    overwrite: bool = False,
    pre_bad: Sequence[BadInput] = (),
    source: dict[str, Any] | None = None,
) -> Manifest:
    """Write a segmentation shard set for ``pairs`` into ``out`` and return its manifest.

    ``test_pairs``: the test set as given (else a group-wise hold-out of ``test_fraction``).
    ``partition``: iid, dirichlet:ALPHA, ... over groups, or ``natural:site`` (the CSV's
    ``site`` column).  ``pre_bad``: files pairing already found unusable.
    """
    if not 2 <= num_classes <= 256:
        raise ConfigError(f"--classes must be in [2, 256] (a uint8 label map), got "
                          f"{num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
    out = Path(out)
    train = decode_pairs(pairs, num_classes=num_classes, channels=channels)
    size = tuple(train.images.shape[2:]) if len(train.images) else None
    test = None if test_pairs is None else decode_pairs(
        test_pairs, num_classes=num_classes, channels=train.images.shape[1] if size else channels,
        size=size)
    bad = [*pre_bad, *train.bad, *(test.bad if test is not None else [])]
    if bad and not skip_bad:
        listed = "\n  ".join(b.message() for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} bad input(s) (use --skip-bad to leave them out and "
                        f"list them in the manifest):\n  {listed}{more}")
    if not len(train.images):
        raise DataError("no usable image/mask pairs")
    labels, groups = train.labels, train.groups
    if test is None:
        kept, held = group_holdout(labels, groups, test_fraction,
                                   seed=derive_seed(seed, _TEST_STREAM))
        test = _subset(train, held)
        train = _subset(train, kept)
        labels, groups = train.labels, train.groups
    if not len(test.images):
        raise DataError("the test set is empty: give test pairs or a larger --test-fraction")
    if partition.startswith("natural:"):
        column = partition.split(":", 1)[1]
        if column != "site" or any(p.site is None for p in train.pairs):
            raise ConfigError("partition natural:site needs a 'site' value on every row of "
                              "the pairs CSV")
        names, parts = natural_partition(np.array([p.site for p in train.pairs]))
        if sites is not None and sites != len(names):
            raise ConfigError(f"--sites {sites}, but the 'site' column names {len(names)}")
    else:
        if sites is None:
            raise ConfigError("--sites is required unless the partition is natural:site")
        parts = group_partition(partition, labels, groups, sites, seed=seed)
    files = [site_file_name(k) for k in range(len(parts))] + [TEST_FILE]
    existing = [name for name in [*files, MANIFEST_FILE] if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{out} already holds {', '.join(existing)}; use --overwrite to "
                          f"replace the shard set")
    out.mkdir(parents=True, exist_ok=True)
    infos: list[ShardInfo] = []
    group_record: dict[str, dict[str, list[str]]] = {}
    #: sha256 of each split's label maps as stored (uint8, row order), as check_shard reads
    mask_digests: dict[str, dict[str, str]] = {}
    for k, part in enumerate(parts):
        site = _subset(train, part)
        keep, val = group_holdout(site.labels, site.groups, val_fraction,
                                  seed=derive_seed(seed, _VAL_STREAM, k))
        splits = {"train": _subset(site, keep), "val": _subset(site, val)}
        infos.append(_write(out / files[k], "site", splits, num_classes, {"site": k}))
        group_record[files[k]] = {s: [p.group for p in d.pairs] for s, d in splits.items()}
        mask_digests[files[k]] = {s: _masks_sha256(d) for s, d in splits.items()}
    test_info = _write(out / TEST_FILE, "test", {"test": test}, num_classes, {})
    group_record[TEST_FILE] = {"test": [p.group for p in test.pairs]}
    mask_digests[TEST_FILE] = {"test": _masks_sha256(test)}
    everything = [*train.pairs, *test.pairs]
    manifest = build_manifest(
        sites=infos, test=test_info, partition=partition, seed=seed,
        source={"name": "segmentation pairs", **(source or {}),
                "num_pairs": len(everything)},
        class_names=class_names,
        skipped=[{"path": b.path, "reason": b.reason} for b in bad] if skip_bad else None)
    manifest = dataclasses.replace(manifest, task="segmentation", segmentation={
        "image_size": [int(v) for v in test.images.shape[2:]],
        "pixel_class_counts": {info.path.name: {s: list(c) for s, c in
                                                (info.pixel_class_counts or {}).items()}
                               for info in [*infos, test_info]},
        "groups": group_record,
        "mask_sha256": mask_digests,
        "pairs": [{"image": p.image.name, "mask": p.mask.name if p.mask else None,
                   "group": p.group, "image_sha256": _sha256(p.image),
                   "mask_sha256": _sha256(p.mask) if p.mask else None}
                  for p in everything],
    })
    write_manifest(out, manifest)
    return manifest


def _subset(data: Decoded, index: np.ndarray) -> Decoded:
    index = np.asarray(index, dtype=np.int64)
    return Decoded([data.pairs[i] for i in index], data.images[index], data.masks[index], [])


def _write(path: Path, kind: str, splits: dict[str, Decoded], num_classes: int,
           attrs: dict[str, Any]) -> ShardInfo:
    first = next(iter(splits.values()))
    with ShardWriter(path, kind=kind, image_shape=first.images.shape[1:] or (1, 1, 1),
                     num_classes=num_classes, attrs=attrs, masks=True) as writer:
        for split, data in splits.items():
            writer.append(split, data.images, data.labels, masks=data.masks)
    return writer.info


def _masks_sha256(data: Decoded) -> str:
    return hashlib.sha256(np.ascontiguousarray(data.masks, dtype=np.uint8).tobytes()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_pattern(pattern: str | None) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--group-pattern {pattern!r} is not a regular expression: "
                          f"{exc}") from None
