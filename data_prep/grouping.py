"""Partitions and hold-outs that keep groups of samples together, and natural partitions.

Medical images come in groups: several images of one patient, several series of one
study.  A hold-out that splits a group leaks it: the model is tested on a patient it
has already seen in training, and the reported accuracy measures recognition of that
patient rather than generalization (record-wise versus subject-wise splitting: Saeb et
al., "The need to approximate the use-case in clinical machine learning", GigaScience
6(5), 2017).  Here a group is the unit: each group gets one representative label (its
most frequent, the smallest on ties), the ordinary stratified hold-out and partitioners
of :mod:`fedsilo.prep.partition` run over the groups, and every sample follows its group.
Without groups every sample is its own group and the results are exactly those of
:mod:`fedsilo.prep.partition`.

A *natural* partition takes the sites from the data itself, one site per distinct value
of a column (the hospital an image came from), as in cross-silo benchmarks such as
FLamby (du Terrail et al., NeurIPS 2022 Datasets and Benchmarks).

>>> labels = np.array([0, 0, 1, 1, 0, 1])
>>> groups = np.array([7, 7, 8, 8, 9, 9])
>>> kept, held = group_holdout(labels, groups, 1 / 3, seed=0)
>>> sorted(set(groups[held].tolist())) in ([7], [8], [9]), len(held)
(True, 2)
>>> natural_partition(np.array(["b", "a", "b"]))
(['a', 'b'], [array([1]), array([0, 2])])
"""

from __future__ import annotations

import numpy as np

from fedsilo.errors import ConfigError
from fedsilo.prep.partition import partition, stratified_holdout


def group_codes(groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Each sample's group number (0..G-1, in sorted order of the values) and G.

    >>> group_codes(np.array(["q", "p", "q"]))
    (array([1, 0, 1]), 2)
    """
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.astype(np.int64).ravel()
    return codes, int(codes.max()) + 1 if codes.size else 0


def group_labels(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's group number and each group's representative label.

    The representative label is the group's most frequent label, the smallest on ties.

    >>> group_labels(np.array([1, 0, 1, 2]), np.array(["p", "p", "p", "q"]))
    (array([0, 0, 0, 1]), array([1, 2]))
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(groups):
        raise ConfigError(f"{len(labels)} labels but {len(groups)} group values")
    codes, num_groups = group_codes(groups)
    if not len(labels):
        return codes, np.zeros(0, dtype=np.int64)
    counts = np.zeros((num_groups, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (codes, labels), 1)
    return codes, counts.argmax(axis=1).astype(np.int64)  # argmax: first (smallest) on ties


def expand(codes: np.ndarray, group_parts: list[np.ndarray]) -> list[np.ndarray]:
    """Sample indices of each part, given the parts as arrays of group numbers."""
    num_groups = int(codes.max()) + 1 if codes.size else 0
    part_of_group = np.full(num_groups, -1, dtype=np.int64)
    for k, part in enumerate(group_parts):
        part_of_group[np.asarray(part, dtype=np.int64)] = k
    part_of_sample = part_of_group[codes]
    return [np.flatnonzero(part_of_sample == k).astype(np.int64) for k in range(len(group_parts))]


def group_partition(
    spec: str,
    labels: np.ndarray,
    groups: np.ndarray | None,
    num_sites: int,
    *,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    """:func:`fedsilo.prep.partition.partition` with every group kept on one site.

    With groups, ``num_sites`` and ``min_size`` count groups, not samples.
    """
    if groups is None:
        return partition(spec, labels, num_sites, seed=seed, min_size=min_size)
    codes, rep = group_labels(labels, groups)
    try:
        parts = partition(spec, rep, num_sites, seed=seed, min_size=min_size)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (samples are grouped by patient here: "
                          f"{len(rep)} groups)") from None
    return expand(codes, parts)


def group_holdout(
    labels: np.ndarray, groups: np.ndarray | None, fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fedsilo.prep.partition.stratified_holdout` with every group on one side.

    With groups, ``fraction`` is the fraction of groups held out, stratified by their
    representative labels; the fraction of samples follows the groups' sizes.
    """
    if groups is None:
        return stratified_holdout(labels, fraction, seed=seed)
    codes, rep = group_labels(labels, groups)
    _, held_groups = stratified_holdout(rep, fraction, seed=seed)
    held = np.isin(codes, held_groups)
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


def natural_partition(values: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """One part per distinct value (sorted as strings), holding that value's indices."""
    values = np.asarray(values).astype(str)
    names = sorted(set(values.tolist()))
    return names, [np.flatnonzero(values == name).astype(np.int64) for name in names]
