"""Turning a source into a shard set: plan, write (streaming, atomic), describe.

Two kinds of source reach the same writer:

* a :class:`SourceData` held in memory (MedMNIST, synthetic): :func:`prepare_shards`;
* a :class:`RecordSource` listed on disk and decoded chunk by chunk (image folders,
  CSV labels, DICOM): :func:`prepare_record_shards`.

Both first decide, for every output file, which samples it holds (a :class:`FileJob`),
from labels alone; then they write every file, or the one file of a SLURM array task.
Each file carries a root attribute ``plan``, the sha256 of the source's identity and
of exactly which samples the file holds.  A file written by an interrupted run of the
same command therefore proves itself: a rerun keeps the files whose ``plan`` matches
and writes only the missing ones (``--overwrite`` rewrites everything).  Files appear
atomically (:class:`~fedsilo.shards.ShardWriter`), so an interruption never leaves a
partial shard.

Seeds: the partition over sites uses ``seed`` itself, so ``fedsilo.prep.partition.partition``
called with the same spec and seed on the training labels (those left after any test
hold-out) reproduces it; the test and validation hold-outs use streams derived from
``seed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from fedsilo.errors import ConfigError, DataError, ShardError
from fedsilo.prep.partition import assign_like, class_histogram
from fedsilo.prep.plan import NATURAL, VAL_STREAM, derive_seed, natural_column, plan_splits
from fedsilo.prep.source import SourceData
from fedsilo.prep.stream import Batch, Decoding, RecordSource, RecordTable, probe_shape
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

log = logging.getLogger(__name__)

#: images handed to the shard writer per call, bounding the extra memory a copy takes
WRITE_BATCH = 1024


class Table(Protocol):
    """Where a file's samples come from: batches of (images, labels) by index."""

    def batches(self, indices: np.ndarray) -> Iterator[Batch]: ...

    def fingerprint(self, indices: np.ndarray) -> str: ...


class ArrayTable:
    """Samples held in memory: one split of a :class:`SourceData`."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray) -> None:
        self.name, self.images, self.labels = name, images, labels

    def batches(self, indices: np.ndarray) -> Iterator[Batch]:
        for start in range(0, len(indices), WRITE_BATCH):
            batch = indices[start : start + WRITE_BATCH]
            yield Batch(images=self.images[batch], labels=self.labels[batch])

    def fingerprint(self, indices: np.ndarray) -> str:
        digest = hashlib.sha256(self.name.encode())
        digest.update(np.asarray(indices, dtype=np.int64).tobytes())
        digest.update(self.labels[indices].astype(np.int64).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class FileJob:
    """One file of the set: its name, kind, root attributes and (split, table, indices)."""

    name: str
    kind: str
    attrs: dict[str, Any]
    splits: tuple[tuple[str, Table, np.ndarray], ...]


@dataclass(frozen=True)
class SetSpec:
    """What every file of a set shares, and what its manifest records."""

    image_shape: tuple[int, int, int]
    num_classes: int
    provenance: dict[str, Any]
    partition: str
    seed: int
    class_names: tuple[str, ...] | None = None
    #: None without --skip-bad; else the inputs left out while listing
    listing_skipped: tuple[dict[str, str], ...] | None = None
    #: threads compressing image chunks (the files do not depend on it)
    threads: int = 1


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
    if not _is_int(participants) or participants < 1:
        raise ConfigError(f"participants must be a positive integer, got {participants!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if "test" not in source.splits and not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            f"source {source.name!r} has no test split, so test_fraction must be in (0, 1), "
            f"got {test_fraction}"
        )
    _check_seed(seed)

    images, labels = source.splits["train"]
    train = ArrayTable("train", images, labels)
    own_test, own_val = "test" in source.splits, "val" in source.splits
    # the record pipeline's planner, so both kinds of source share every hold-out; a
    # split the source brings itself is not held out again
    val = 0.0 if own_val else val_fraction
    test = None if own_test else test_fraction
    plan = plan_splits(labels, partition=partition, num_sites=participants, seed=seed,
                       val_fraction=val, test_fraction=test)
    site_train = list(plan.site_train)
    if own_test:
        test_table = ArrayTable("test", *source.splits["test"])
        test_idx = np.arange(len(test_table.labels), dtype=np.int64)
    else:
        test_table, test_idx = train, plan.test
    if own_val:
        site_val, val_table = _follow_label_mix(source, site_train, seed=seed)
    else:
        site_val, val_table = list(plan.site_val), train

    spec = SetSpec(image_shape=source.image_shape, num_classes=source.num_classes,
                   provenance=source.provenance, partition=partition, seed=int(seed))
    attrs = {"partition": partition, "seed": int(seed), "num_sites": int(participants),
             "source": source.name}
    jobs = [_job(spec, site_file_name(k), "site", {**attrs, "site": k},
                 (("train", train, site_train[k]), ("val", val_table, site_val[k])))
            for k in range(participants)]
    jobs.append(_job(spec, TEST_FILE, "test", attrs, (("test", test_table, test_idx),)))
    return _write_set(Path(out_dir), jobs, spec, only=only, overwrite=overwrite)


def prepare_record_shards(
    source: RecordSource,
    *,
    out_dir: str | os.PathLike[str],
    participants: int | None,
    partition: str,
    seed: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    test_split: str = "global",
    patient_column: str | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    overwrite: bool = False,
    only: str | None = None,
) -> Manifest | None:
    """Write the shard set of a listed dataset, decoding its images chunk by chunk.

    Planned on the records (:func:`fedsilo.prep.plan.plan_splits`): ``participants`` may be
    None only for ``natural:COLUMN``, which makes one site per value of the column.
    ``patient_column`` keeps each patient's records in one split and one site.
    ``workers`` > 1 decodes on that many processes and compresses on that many threads;
    the files do not depend on it.
    ``skip_bad`` leaves bad inputs out and lists them in the manifest instead of
    stopping at the first.  ``only`` is as for :func:`prepare_shards`, plus ``task:T``
    (a SLURM array task id: sites first, then the test file).
    """
    if participants is not None and (not _is_int(participants) or participants < 1):
        raise ConfigError(f"participants must be a positive integer, got {participants!r}")
    _check_seed(seed)
    records = source.records
    column = natural_column(partition)

    def values_of(name: str, option: str) -> np.ndarray:
        if name not in records.columns:
            raise ConfigError(f"{option} names the column {name!r}, but source {source.name!r} "
                              f"has no such column (a labels file is needed)")
        return np.asarray(records.columns[name], dtype=str)

    plan = plan_splits(
        records.labels, partition=partition, num_sites=participants, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction, test_split=test_split,
        patients=None if patient_column is None else values_of(patient_column, "--patient-column"),
        site_values=None if column is None else values_of(column, f"--partition {partition}"),
    )
    if records.problems:
        log.warning("%s: left out %d bad input(s) while listing", source.name,
                    len(records.problems))
    provenance = {
        **source.provenance,
        "decoder": source.decoder.describe(),
        "num_records": len(records),
        "records_sha256": records.fingerprint(),
        "options": {"val_fraction": val_fraction, "test_fraction": test_fraction,
                    "test_split": test_split, "patient_column": patient_column,
                    "skip_bad": bool(skip_bad)},
    }
    if plan.site_names is not None:
        provenance[NATURAL] = {"column": column, "sites": list(plan.site_names)}
    with Decoding(source.decoder, workers=workers) as decoding:
        image_shape, first_path = probe_shape(source, skip_bad=skip_bad)
        table = RecordTable(source, decoding, image_shape=image_shape, first_path=first_path,
                            skip_bad=skip_bad)
        spec = SetSpec(
            image_shape=image_shape, num_classes=len(records.class_names), provenance=provenance,
            partition=partition, seed=int(seed), class_names=records.class_names,
            listing_skipped=tuple(p.to_dict() for p in records.problems) if skip_bad else None,
            threads=workers,
        )
        attrs = {"partition": partition, "seed": int(seed), "num_sites": plan.num_sites,
                 "source": source.name}
        jobs = []
        for k in range(plan.num_sites):
            named = {} if plan.site_names is None else {"site_name": plan.site_names[k]}
            jobs.append(_job(spec, site_file_name(k), "site", {**attrs, "site": k, **named},
                             (("train", table, plan.site_train[k]),
                              ("val", table, plan.site_val[k]))))
        jobs.append(_job(spec, TEST_FILE, "test", attrs, (("test", table, plan.test),)))
        return _write_set(Path(out_dir), jobs, spec, only=only, overwrite=overwrite)


# --- writing a set ----------------------------------------------------------------------


def _job(spec: SetSpec, name: str, kind: str, attrs: dict[str, Any],
         splits: tuple[tuple[str, Table, np.ndarray], ...]) -> FileJob:
    identity = {
        "source": spec.provenance, "partition": spec.partition, "seed": spec.seed,
        "image_shape": list(spec.image_shape), "kind": kind, "attrs": attrs,
        "splits": [[split, table.fingerprint(idx)] for split, table, idx in splits],
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return FileJob(name=name, kind=kind, attrs={**attrs, "plan": digest}, splits=splits)


def _write_set(out: Path, jobs: list[FileJob], spec: SetSpec, *, only: str | None,
               overwrite: bool) -> Manifest | None:
    if only is not None:
        return _write_one(out, jobs, spec, only=only, overwrite=overwrite)
    # only now, with every split decided, is the directory touched: a bad spec or
    # fraction must not cost an existing shard set its manifest
    stale, reusable = _claim(out, jobs, overwrite=overwrite)
    _clear_temporaries(out, [job.name for job in jobs] + [MANIFEST_FILE])
    results = []
    for job in jobs:
        if job.name in reusable:
            log.info("%s: kept, written by an earlier run of this same preparation", job.name)
            results.append(_reuse(out, job, spec))
        else:
            results.append(_write_file(out, job, spec))
    manifest = _manifest(results, spec)
    write_manifest(out, manifest)
    keep = {e.file for e in (*manifest.sites, manifest.test)}
    for path in stale:
        if path.name not in keep:
            path.unlink(missing_ok=True)
    return manifest


def _write_one(out: Path, jobs: list[FileJob], spec: SetSpec, *, only: str,
               overwrite: bool) -> Manifest | None:
    """One file of the set (an array task), then the manifest if the set is complete."""
    job = _pick(jobs, only)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_FILE
    if manifest_path.exists():
        if not overwrite:
            raise DataError(f"{out} already holds a shard set ({MANIFEST_FILE}); pass "
                            f"--overwrite to replace it")
        manifest_path.unlink(missing_ok=True)  # it would vouch for a mix of old and new files
    _clear_temporaries(out, [job.name])
    if not overwrite and _file_plan(out / job.name) == job.attrs["plan"]:
        log.info("%s: kept, written by an earlier run of this same task", job.name)
    else:
        _write_file(out, job, spec)
    return _finish_if_complete(out, jobs, spec)


def _pick(jobs: list[FileJob], only: str) -> FileJob:
    participants = len(jobs) - 1
    kind, _, index = only.partition(":")
    if kind == "task" and index.isdigit():
        if int(index) > participants:
            raise ConfigError(f"array task {index} is beyond this set's {participants + 1} files "
                              f"(submit the array as 0-{participants})")
        return jobs[int(index)]
    if only == "test":
        return jobs[-1]
    if kind == "site" and index.isdigit() and int(index) < participants:
        return jobs[int(index)]
    raise ConfigError(f"--only must be 'test' or 'site:K' with 0 <= K < {participants}, "
                      f"got {only!r}")


def _write_file(out: Path, job: FileJob, spec: SetSpec) -> tuple[ShardInfo, list[dict[str, str]]]:
    skipped: list[dict[str, str]] = []
    counts = dict.fromkeys((split for split, _, _ in job.splits), 0)
    with ShardWriter(out / job.name, kind=job.kind, image_shape=spec.image_shape,
                     num_classes=spec.num_classes, attrs=job.attrs, threads=spec.threads) as writer:
        for split, table, indices in job.splits:
            for batch in table.batches(indices):
                writer.append(split, batch.images, batch.labels)
                counts[split] += len(batch.labels)
                skipped += [bad.to_dict() for bad in batch.skipped]
                del batch  # else it stays alive while the generator decodes the next chunk
        if job.kind == "site" and counts["train"] == 0:
            raise DataError(f"{out / job.name}: no training images left after leaving out "
                            f"{len(skipped)} bad input(s)")
        if spec.listing_skipped is not None:
            writer.set_attrs({"skipped": json.dumps(skipped)})
    if skipped:
        log.warning("%s: left out %d bad input(s)", job.name, len(skipped))
    return writer.info, skipped


def _reuse(out: Path, job: FileJob, spec: SetSpec) -> tuple[ShardInfo, list[dict[str, str]]]:
    path = out / job.name
    info = check_shard(path, kind=job.kind, image_shape=spec.image_shape,
                       num_classes=spec.num_classes)
    return info, _file_skipped(path)


def _finish_if_complete(out: Path, jobs: list[FileJob], spec: SetSpec) -> Manifest | None:
    """Write the manifest when every file of this set is there (files appear atomically)."""
    paths = [out / job.name for job in jobs]
    if not all(p.exists() for p in paths):
        return None
    results = []
    for job, path in zip(jobs, paths):
        file_attrs = read_shard_attrs(path)
        if any(file_attrs.get(key) != value for key, value in job.attrs.items()):
            return None  # a file of another shard set: its own task has not rewritten it yet
        results.append(_reuse(out, job, spec))
    manifest = _manifest(results, spec)
    write_manifest(out, manifest)
    return manifest


def _manifest(results: list[tuple[ShardInfo, list[dict[str, str]]]], spec: SetSpec) -> Manifest:
    skipped = None
    if spec.listing_skipped is not None:
        skipped = [*spec.listing_skipped, *(item for _, items in results for item in items)]
    infos = [info for info, _ in results]
    return build_manifest(sites=infos[:-1], test=infos[-1], source=spec.provenance,
                          partition=spec.partition, seed=spec.seed,
                          class_names=spec.class_names, skipped=skipped)


def _claim(out: Path, jobs: list[FileJob], *, overwrite: bool) -> tuple[list[Path], set[str]]:
    """Make ``out`` ready for a new shard set.

    Returns the old shard files to clear once the new set is complete, and the names of
    files that an interrupted run of this same preparation already wrote (kept).
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(
        p for p in out.iterdir() if p.name in (MANIFEST_FILE, TEST_FILE) or _is_site_file(p.name)
    )
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        if (out / MANIFEST_FILE).exists():
            raise DataError(f"{out} already holds a shard set ({names}); refusing to replace it "
                            f"without --overwrite")
        plans = {job.name: job.attrs["plan"] for job in jobs}
        foreign = [p.name for p in existing
                   if p.name not in plans or _file_plan(p) != plans[p.name]]
        if foreign:
            shown = ", ".join(foreign[:4]) + (" ..." if len(foreign) > 4 else "")
            raise DataError(f"{out} already holds shard files of another preparation ({shown}) "
                            f"and no manifest; refusing to replace them without --overwrite")
        return [], {p.name for p in existing}
    # the old manifest goes first: a set whose rewrite fails part-way then has no
    # manifest, rather than one that vouches for a mix of old and new files
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    return [p for p in existing if p.name != MANIFEST_FILE], set()


def _file_plan(path: Path) -> str | None:
    """The ``plan`` attribute of a shard file, or None if there is no readable one."""
    if not path.is_file():
        return None
    try:
        plan = read_shard_attrs(path).get("plan")
    except (OSError, ShardError, KeyError, ValueError):
        return None
    return plan if isinstance(plan, str) else None


def _file_skipped(path: Path) -> list[dict[str, str]]:
    text = read_shard_attrs(path).get("skipped", "[]")
    try:
        items = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: unreadable 'skipped' attribute: {exc}") from exc
    return [{"path": str(i["path"]), "reason": str(i["reason"])} for i in items]


def _clear_temporaries(out: Path, names: Sequence[str]) -> None:
    """Remove what killed writers of these files left behind (their temporary files).

    An array task clears only its own file's: another task may be writing the manifest.
    """
    for name in names:
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _follow_label_mix(
    source: SourceData, site_train: list[np.ndarray], *, seed: int
) -> tuple[list[np.ndarray], ArrayTable]:
    """Split the source's own val split over the sites, each like its training label mix."""
    labels = source.splits["train"][1]
    hists = np.stack([class_histogram(labels[idx], source.num_classes) for idx in site_train])
    val_images, val_labels = source.splits["val"]
    site_val = assign_like(val_labels, hists, seed=derive_seed(seed, VAL_STREAM))
    return site_val, ArrayTable("val", val_images, val_labels)


def _check_seed(seed: object) -> None:
    if not _is_int(seed) or seed < 0:  # type: ignore[operator]
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def _is_site_file(name: str) -> bool:
    return name.startswith("site-") and name.endswith(".h5") and name[5:-3].isdigit()


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
