"""Turning a :class:`SourceData` into a shard set: partition, hold out, write, describe.

Seeds: the partition over sites uses ``seed`` itself, so ``fedsilo.partition.partition``
called with the same spec and seed on the training labels (those left after any test
hold-out) reproduces it; the test and validation hold-outs use streams derived from
``seed``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_prep.source import SourceData
from fedsilo.errors import ConfigError, DataError
from fedsilo.partition import assign_like, class_histogram, stratified_holdout
from fedsilo.partition import partition as partition_sites
from fedsilo.shards import (
    MANIFEST_FILE,
    TEST_FILE,
    Manifest,
    ShardInfo,
    ShardWriter,
    build_manifest,
    check_shard,
    read_shard_attrs,
    site_file_name,
    write_manifest,
)

#: images handed to the shard writer per call, bounding the extra memory a copy takes
WRITE_BATCH = 1024

_TEST_STREAM, _VAL_STREAM = 1, 2


def prepare_shards(
    source: SourceData,
    *,
    out_dir: str | os.PathLike[str],
    participants: int,
    partition: str,
    seed: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    overwrite: bool = False,
    only: str | None = None,
) -> Manifest | None:
    """Write ``site-000.h5 ...``, ``test.h5`` and ``manifest.json`` into ``out_dir``.

    ``only="site:K"`` or ``only="test"`` writes that one file (one task of a SLURM array:
    the partition is recomputed identically in every task, so the files equal the serial
    ones); the task that finds the whole set present and consistent writes the manifest
    and returns it, the others return None.

    The source's train split is partitioned over ``participants`` sites.  Its val split,
    if any, follows each site's label mix (:func:`assign_like`); otherwise each site
    keeps a stratified ``val_fraction`` of its samples for validation.  Its test split,
    or else a stratified ``test_fraction`` of train, becomes ``test.h5``.
    """
    out = Path(out_dir)
    if not _is_int(participants) or participants < 1:
        raise ConfigError(f"participants must be a positive integer, got {participants!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if "test" not in source.splits and not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            f"source {source.name!r} has no test split, so test_fraction must be in (0, 1), "
            f"got {test_fraction}"
        )
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")

    images, labels = source.splits["train"]
    if "test" in source.splits:
        pool = np.arange(len(labels), dtype=np.int64)
        test_images, test_labels = source.splits["test"]
        test_idx = np.arange(len(test_labels), dtype=np.int64)
    else:
        pool, test_idx = stratified_holdout(labels, test_fraction, seed=_derive(seed, _TEST_STREAM))
        test_images, test_labels = images, labels
    parts = partition_sites(partition, labels[pool], participants, seed=seed)
    site_train = [pool[p] for p in parts]
    site_val, val_source = _validation(source, site_train, val_fraction=val_fraction, seed=seed)

    attrs = {"partition": partition, "seed": int(seed), "num_sites": int(participants),
             "source": source.name}  # fmt: skip
    if only is not None:
        return _prepare_one(source, out, only=only, participants=participants, attrs=attrs,
                            site_train=site_train, site_val=site_val, val_source=val_source,
                            test=(test_images, test_labels, test_idx), overwrite=overwrite,
                            partition=partition, seed=seed)

    # only now, with every split decided, is the directory touched: a bad spec or
    # fraction must not cost an existing shard set its manifest
    stale = _claim(out, overwrite=overwrite)

    site_infos: list[ShardInfo] = []
    for k in range(participants):
        with ShardWriter(
            out / site_file_name(k), kind="site", image_shape=source.image_shape,
            num_classes=source.num_classes, attrs={**attrs, "site": k},
        ) as writer:  # fmt: skip
            _append(writer, "train", images, labels, site_train[k])
            _append(writer, "val", *val_source, site_val[k])
        site_infos.append(writer.info)
    with ShardWriter(
        out / TEST_FILE, kind="test", image_shape=source.image_shape,
        num_classes=source.num_classes, attrs=attrs,
    ) as writer:  # fmt: skip
        _append(writer, "test", test_images, test_labels, test_idx)

    manifest = build_manifest(
        sites=site_infos, test=writer.info, source=source.provenance,
        partition=partition, seed=seed,
    )  # fmt: skip
    write_manifest(out, manifest)
    keep = {e.file for e in (*manifest.sites, manifest.test)}
    for path in stale:
        if path.name not in keep:
            path.unlink(missing_ok=True)
    return manifest


def _prepare_one(source: SourceData, out: Path, *, only: str, participants: int, attrs: dict,
                 site_train: list, site_val: list, val_source: tuple, test: tuple,
                 overwrite: bool, partition: str, seed: int) -> Manifest | None:
    """One file of the set (an array task), then the manifest if the set is complete."""
    kind, _, index = only.partition(":")
    if not (only == "test" or (kind == "site" and index.isdigit()
                               and int(index) < participants)):
        raise ConfigError(f"--only must be 'test' or 'site:K' with 0 <= K < {participants}, "
                          f"got {only!r}")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_FILE
    if manifest_path.exists():
        if not overwrite:
            raise DataError(f"{out} already holds a shard set ({MANIFEST_FILE}); pass "
                            f"--overwrite to replace it")
        manifest_path.unlink(missing_ok=True)  # it would vouch for a mix of old and new files
    images, labels = source.splits["train"]
    if only == "test":
        with ShardWriter(out / TEST_FILE, kind="test", image_shape=source.image_shape,
                         num_classes=source.num_classes, attrs=attrs) as writer:
            _append(writer, "test", *test)
    else:
        k = int(index)
        with ShardWriter(out / site_file_name(k), kind="site", image_shape=source.image_shape,
                         num_classes=source.num_classes, attrs={**attrs, "site": k}) as writer:
            _append(writer, "train", images, labels, site_train[k])
            _append(writer, "val", *val_source, site_val[k])
    return _finish_if_complete(out, participants=participants, attrs=attrs, source=source,
                               partition=partition, seed=seed)


def _finish_if_complete(out: Path, *, participants: int, attrs: dict, source: SourceData,
                        partition: str, seed: int) -> Manifest | None:
    """Write the manifest when every file of this set is there (files appear atomically)."""
    paths = [out / site_file_name(k) for k in range(participants)] + [out / TEST_FILE]
    if not all(p.exists() for p in paths):
        return None
    infos = []
    for k, path in enumerate(paths):
        kind = "test" if path.name == TEST_FILE else "site"
        file_attrs = read_shard_attrs(path)
        expected = attrs if kind == "test" else {**attrs, "site": k}
        if any(file_attrs.get(key) != value for key, value in expected.items()):
            return None  # a file of another shard set: its own task has not rewritten it yet
        infos.append(check_shard(path, kind=kind, image_shape=source.image_shape,
                                 num_classes=source.num_classes))
    manifest = build_manifest(sites=infos[:-1], test=infos[-1], source=source.provenance,
                              partition=partition, seed=seed)
    write_manifest(out, manifest)
    return manifest


def _validation(
    source: SourceData, site_train: list[np.ndarray], *, val_fraction: float, seed: int
) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Per-site validation indices, and the (images, labels) arrays they index into.

    Without a source val split the held-out samples are removed from ``site_train``
    in place.
    """
    images, labels = source.splits["train"]
    if "val" in source.splits:
        hists = np.stack([class_histogram(labels[idx], source.num_classes) for idx in site_train])
        val_images, val_labels = source.splits["val"]
        site_val = assign_like(val_labels, hists, seed=_derive(seed, _VAL_STREAM))
        return site_val, (val_images, val_labels)
    site_val = []
    for k, idx in enumerate(site_train):
        keep, held = stratified_holdout(
            labels[idx], val_fraction, seed=_derive(seed, _VAL_STREAM, k)
        )
        if len(keep) == 0:
            raise DataError(
                f"site {k} would keep no training samples after holding out a validation "
                f"fraction of {val_fraction}; lower the fraction or use fewer participants"
            )
        site_train[k], held_idx = idx[keep], idx[held]
        site_val.append(held_idx)
    return site_val, (images, labels)


def _append(
    writer: ShardWriter, split: str, images: np.ndarray, labels: np.ndarray, idx: np.ndarray
) -> None:
    for start in range(0, len(idx), WRITE_BATCH):
        batch = idx[start : start + WRITE_BATCH]
        writer.append(split, images[batch], labels[batch])


def _claim(out: Path, *, overwrite: bool) -> list[Path]:
    """Make ``out`` ready for a new shard set; return the old shard files to clear later."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(
        p for p in out.iterdir() if p.name in (MANIFEST_FILE, TEST_FILE) or _is_site_file(p.name)
    )
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise DataError(
            f"{out} already holds a shard set ({names}); refusing to replace it without "
            f"--overwrite"
        )
    # the old manifest goes first: a set whose rewrite fails part-way then has no
    # manifest, rather than one that vouches for a mix of old and new files
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    return [p for p in existing if p.name != MANIFEST_FILE]


def _is_site_file(name: str) -> bool:
    return name.startswith("site-") and name.endswith(".h5") and name[5:-3].isdigit()


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _derive(seed: int, *tags: int) -> int:
    """An independent integer seed for one purpose, derived from the user's seed."""
    return int(np.random.SeedSequence([int(seed), *tags]).generate_state(1)[0])
