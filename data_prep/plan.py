"""Which records go into which file: test hold-out, sites, validation (pure numpy).

Planned on labels, site values and patient ids only, before any pixel is decoded, so
every SLURM array task computes the same plan cheaply.  Seeds: the partition over sites
uses ``seed`` itself; the test and validation hold-outs use streams derived from it.
In-memory sources (:func:`fedsilo.prep.pipeline.prepare_shards`) are planned here too,
so there is one implementation of every hold-out.

* ``test_split="global"``: a stratified ``test_fraction`` of all records becomes the
  test set, and the rest is partitioned over the sites.
* ``test_split="per-site"``: the records are partitioned first, then each site holds
  out a stratified ``test_fraction`` of its own records; the test set is the union, in
  site order.  Every site (every hospital, under ``natural:COLUMN``) is represented in
  the test set in proportion to its size.
* ``test_fraction=None``: nothing is held out for testing (the source brings its own
  test split); every record is partitioned over the sites.

Each site then holds out a stratified ``val_fraction`` of its training records.  With
patient ids, every hold-out and the partition keep a patient's records together
(:mod:`fedsilo.prep.grouping`), so no patient is on both sides of any split.

>>> plan = plan_splits(np.arange(40) % 2, partition="iid", num_sites=2, seed=0,
...                    val_fraction=0.1, test_fraction=0.25)
>>> len(plan.test), [len(t) for t in plan.site_train], [len(v) for v in plan.site_val]
(10, [13, 13], [2, 2])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsilo.errors import ConfigError, DataError
from fedsilo.prep.grouping import group_codes, group_holdout, group_partition, natural_partition
from fedsilo.seeds import derive_seed

TEST_SPLITS = ("global", "per-site")
NATURAL = "natural"

#: derived-seed tags of the hold-outs (shared with fedsilo.prep.pipeline)
TEST_STREAM, VAL_STREAM = 1, 2
_TEST_STREAM, _VAL_STREAM = TEST_STREAM, VAL_STREAM


@dataclass(frozen=True)
class SplitPlan:
    """Record indices of each site's train and val split, and of the test set."""

    site_train: tuple[np.ndarray, ...]
    site_val: tuple[np.ndarray, ...]
    test: np.ndarray
    #: the column values of ``natural:COLUMN`` sites, else None
    site_names: tuple[str, ...] | None = None

    @property
    def num_sites(self) -> int:
        return len(self.site_train)


def natural_column(spec: str) -> str | None:
    """The column of a ``natural:COLUMN`` spec, or None for any other spec."""
    name, sep, param = spec.strip().partition(":")
    if name != NATURAL:
        return None
    if not sep or not param.strip():
        raise ConfigError(f"bad partition spec {spec!r}: expected natural:COLUMN, "
                          f"e.g. natural:hospital")
    return param.strip()


def patient_groups(values: np.ndarray | list[str] | tuple[str, ...]) -> np.ndarray:
    """Group numbers from patient ids; an empty id is a group of its own."""
    values = np.asarray(values).astype(str)
    codes, num_groups = group_codes(values)
    empty = np.flatnonzero(values == "")
    codes[empty] = num_groups + np.arange(len(empty))
    return codes


def plan_splits(
    labels: np.ndarray,
    *,
    partition: str,
    num_sites: int | None,
    seed: int,
    val_fraction: float,
    test_fraction: float | None,
    test_split: str = "global",
    patients: np.ndarray | None = None,
    site_values: np.ndarray | None = None,
) -> SplitPlan:
    """Plan the files of a shard set from the records' labels (patient ids, site values).

    ``patients[i]`` is record i's patient id (an empty id: a patient of its own);
    ``site_values`` is the column of a ``natural:COLUMN`` partition.  ``test_fraction``
    None holds out no test set (``plan.test`` is empty).
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = None if patients is None else patient_groups(patients)
    if test_split not in TEST_SPLITS:
        raise ConfigError(f"test split must be one of {list(TEST_SPLITS)}, got {test_split!r}")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    column = natural_column(partition)
    names: tuple[str, ...] | None = None
    if column is not None:
        if site_values is None:
            raise ConfigError(f"partition {partition!r} needs the column {column!r} "
                              f"of a labels file")
        site_names, natural = natural_partition(np.asarray(site_values))
        names = tuple(site_names)
        if num_sites is not None and num_sites != len(names):
            shown = ", ".join(map(repr, names[:6])) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"partition {partition!r}: column {column!r} has {len(names)} distinct values "
                f"({shown}), so it makes {len(names)} sites, but --sites is {num_sites}; "
                f"omit --sites or set it to {len(names)}"
            )
        if groups is not None:
            _check_patients_stay_on_one_site(groups, np.asarray(patients).astype(str), natural,
                                             names, column)
    elif num_sites is None:
        raise ConfigError(f"partition {partition!r} needs the number of sites (--sites)")

    def sub(idx: np.ndarray) -> np.ndarray | None:
        return None if groups is None else groups[idx]

    def split_sites(pool: np.ndarray) -> list[np.ndarray]:
        if column is not None:
            return [np.intersect1d(part, pool) for part in natural]
        parts = group_partition(partition, labels[pool], sub(pool), num_sites, seed=seed)
        return [pool[p] for p in parts]

    everything = np.arange(len(labels), dtype=np.int64)
    if test_fraction is None:
        sites, test = split_sites(everything), np.zeros(0, np.int64)
    elif test_split == "global":
        kept, held = group_holdout(labels, sub(everything), test_fraction,
                                   seed=_derive(seed, _TEST_STREAM))
        sites, test = split_sites(kept), held
    else:
        sites, tests = [], []
        for k, part in enumerate(split_sites(everything)):
            keep, held = group_holdout(labels[part], sub(part), test_fraction,
                                       seed=_derive(seed, _TEST_STREAM, k))
            sites.append(part[keep])
            tests.append(part[held])
        test = np.concatenate(tests) if tests else np.zeros(0, np.int64)
    train, val = [], []
    for k, part in enumerate(sites):
        label = f"site {k}" + (f" ({column} = {names[k]!r})" if names else "")
        if not len(part):
            raise DataError(f"{label} has no records left after the test hold-out; use a smaller "
                            f"--test-fraction or fewer sites")
        keep, held = group_holdout(labels[part], sub(part), val_fraction,
                                   seed=_derive(seed, _VAL_STREAM, k))
        if not len(keep):
            raise DataError(f"{label} would keep no training records after holding out a "
                            f"validation fraction of {val_fraction}; lower the fraction or use "
                            f"fewer sites")
        train.append(part[keep])
        val.append(part[held])
    return SplitPlan(site_train=tuple(train), site_val=tuple(val), test=test.astype(np.int64),
                     site_names=names)


_derive = derive_seed  # fedsilo.seeds.derive_seed (32 bits), re-exported for fedsilo.prep.pipeline


def _check_patients_stay_on_one_site(groups: np.ndarray, ids: np.ndarray, parts: list[np.ndarray],
                                     names: tuple[str, ...], column: str) -> None:
    site_of = np.full(int(groups.max()) + 1 if len(groups) else 0, -1, dtype=np.int64)
    for k, part in enumerate(parts):
        for g in np.unique(groups[part]):
            if site_of[g] != -1:
                patient = str(ids[np.flatnonzero(groups == g)[0]])
                raise DataError(
                    f"patient {patient!r} has records on two sites ({column} = "
                    f"{names[site_of[g]]!r} and {names[k]!r}); a natural partition keeps each "
                    f"patient on one site: fix the labels file"
                )
            site_of[g] = k
