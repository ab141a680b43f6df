"""Checking a whole shard set against its manifest (``fedsilo prep verify``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from fedsilo.errors import ShardError
from fedsilo.shards.check import check_shard
from fedsilo.shards.hdf5 import ShardInfo, sha256_file
from fedsilo.shards.manifest import Manifest, SiteEntry, load_manifest
from fedsilo.shards.stats import PixelStats, combine


def verify_shard_set(directory: str | os.PathLike[str]) -> list[str]:
    """Every problem with the shard set in ``directory``; an empty list when it is sound.

    Checks the manifest, then each file: presence, sha256, format, shapes, label ranges,
    and that its per-split sample and class counts match the manifest; finally that the
    manifest's normalization agrees with the sites' pixel sums.  In a segmentation set,
    also each split's label maps (``check_shard``: shape equal to the images', every value
    a class, pixel counts as stored) against the manifest's pixel class counts, mask
    sha256 and image size.
    """
    directory = Path(directory)
    try:
        manifest = load_manifest(directory)
    except ShardError as exc:
        return [str(exc)]
    problems: list[str] = []
    train_stats: list[PixelStats] = []
    entries = [(entry, "site") for entry in manifest.sites] + [(manifest.test, "test")]
    for entry, kind in entries:
        stats = _verify_file(manifest, directory, entry, kind, problems)
        if stats is not None and kind == "site":
            train_stats.append(stats)
    if len(train_stats) == manifest.num_sites:
        norm = combine(train_stats)
        for label, have, want in (
            ("mean", norm.mean, manifest.normalization_mean),
            ("std", norm.std, manifest.normalization_std),
        ):
            if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(have, want)):
                problems.append(
                    f"{directory / 'manifest.json'}: normalization {label} {list(want)} "
                    f"disagrees with the sites' pixel sums {list(have)}"
                )
    return problems


def _verify_file(
    manifest: Manifest, directory: Path, entry: SiteEntry, kind: str, problems: list[str]
) -> PixelStats | None:
    """Append this file's problems; return its train statistics if it is sound."""
    path = manifest.path_of(entry, directory)
    try:
        info = check_shard(
            path, kind=kind, image_shape=manifest.image_shape, num_classes=manifest.num_classes,
            task=manifest.task,
        )
    except ShardError as exc:
        problems.append(str(exc))
        # still say whether the bytes changed: it tells corruption from a wrong file
        if path.is_file():
            try:
                digest = sha256_file(path)
            except OSError:
                return None
            if digest != entry.sha256:
                problems.append(_sha_problem(path, entry.sha256, digest))
        return None
    found = len(problems)
    if info.sha256 != entry.sha256:
        problems.append(_sha_problem(path, entry.sha256, info.sha256))
    for split in sorted(set(entry.num_samples) | set(info.num_samples)):
        if split not in info.num_samples:
            problems.append(f"{path}: manifest lists split {split!r} but the file has none")
        elif split not in entry.num_samples:
            problems.append(f"{path}: file has split {split!r} that the manifest does not list")
        elif info.num_samples[split] != entry.num_samples[split]:
            problems.append(
                f"{path} [{split}]: {info.num_samples[split]} samples in the file, "
                f"{entry.num_samples[split]} in the manifest"
            )
        elif tuple(info.class_counts[split]) != tuple(entry.class_counts[split]):
            problems.append(
                f"{path} [{split}]: class counts {list(info.class_counts[split])} in the file, "
                f"{list(entry.class_counts[split])} in the manifest"
            )
    if manifest.task == "segmentation":
        _verify_masks(manifest, path, entry, info, problems)
    if len(problems) > found or "train" not in info.stats:
        return None
    return info.stats["train"]


def _verify_masks(manifest: Manifest, path: Path, entry: SiteEntry, info: ShardInfo,
                  problems: list[str]) -> None:
    """A segmentation file's label maps against the manifest's ``segmentation`` section."""
    section = manifest.segmentation or {}
    size = section.get("image_size")
    if size is not None and list(size) != list(manifest.image_shape[1:]):
        problems.append(f"{path}: the manifest's segmentation.image_size {list(size)} is not "
                        f"its image shape's {list(manifest.image_shape[1:])}")
    counts = section.get("pixel_class_counts", {}).get(entry.file, {})
    digests = section.get("mask_sha256", {}).get(entry.file)
    for split in sorted(info.pixel_class_counts or {}):
        have = list((info.pixel_class_counts or {})[split])
        want = counts.get(split)
        if want is not None and list(want) != have:
            problems.append(f"{path} [{split}]: mask pixel counts per class {have} in the "
                            f"file, {list(want)} in the manifest")
        digest = (info.mask_sha256 or {}).get(split)
        if digests is not None and digests.get(split) != digest:
            expected = str(digests.get(split))
            problems.append(f"{path} [{split}]: masks sha256 mismatch: manifest has "
                            f"{expected[:12]}..., file has {str(digest)[:12]}... (the label "
                            f"maps changed since prep wrote them)")


def _sha_problem(path: Path, expected: str, actual: str) -> str:
    return (
        f"{path}: sha256 mismatch: manifest has {expected[:12]}..., file has {actual[:12]}..."
    )
