"""Checking a whole shard set against its manifest (``fedsilo prep verify``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from fedsilo.errors import ShardError
from fedsilo.shards.check import check_shard
from fedsilo.shards.hdf5 import sha256_file
from fedsilo.shards.manifest import Manifest, SiteEntry, load_manifest
from fedsilo.shards.stats import PixelStats, combine


def verify_shard_set(directory: str | os.PathLike[str]) -> list[str]:
    """Every problem with the shard set in ``directory``; an empty list when it is sound.

    Checks the manifest, then each file: presence, sha256, format, shapes, label ranges,
    and that its per-split sample and class counts match the manifest; finally that the
    manifest's normalization agrees with the sites' pixel sums.
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
            path, kind=kind, image_shape=manifest.image_shape, num_classes=manifest.num_classes
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
    if len(problems) > found or "train" not in info.stats:
        return None
    return info.stats["train"]


def _sha_problem(path: Path, expected: str, actual: str) -> str:
    return (
        f"{path}: sha256 mismatch: manifest has {expected[:12]}..., file has {actual[:12]}..."
    )
