"""Splitting one labelled dataset over federated sites (pure numpy).

Partitioners are chosen by a spec string, ``NAME`` or ``NAME:PARAM``:

* ``iid`` -- a uniform random split; site sizes differ by at most one.
* ``dirichlet:ALPHA`` -- label skew.  For every class, the proportions of its samples
  that go to each site are drawn from ``Dirichlet(ALPHA, ..., ALPHA)``; small ALPHA
  gives each site few dominant classes, large ALPHA approaches ``iid``.  The Dirichlet
  model of non-identical label distributions is from Hsu, Qi & Brown, "Measuring the
  Effects of Non-Identical Data Distribution for Federated Visual Classification"
  (arXiv:1909.06335, 2019); the per-class draw over sites is the form used by Yurochkin
  et al. (ICML 2019), Wang et al. (FedMA, ICLR 2020) and NIID-Bench (Li et al., ICDE 2022).
* ``quantity:ALPHA`` -- size skew: site sizes proportional to one ``Dirichlet(ALPHA)``
  draw, labels ignored (NIID-Bench's quantity skew).
* ``classes:K`` -- each site sees exactly K classes (NIID-Bench's ``#C=K``), every
  class is owned by at least one site, and a class's samples are split evenly between
  the sites that own it.
* ``natural:COLUMN`` -- one site per distinct value of a column of the data (the
  hospital an image came from).  Labels alone do not carry it, so :func:`partition`
  refuses it; :func:`fedsilo.prep.grouping.natural_partition` does the work.

>>> parts = partition("iid", np.array([0, 1, 0, 1, 1]), 2, seed=0)
>>> sorted(np.concatenate(parts).tolist())
[0, 1, 2, 3, 4]
>>> [len(p) for p in parts]
[3, 2]
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from fedsilo.errors import ConfigError
from fedsilo.registry import Registry

#: draws one candidate partition: (labels, num_sites, rng) -> one index array per site
Draw = Callable[[np.ndarray, int, np.random.Generator], list[np.ndarray]]
#: builds a Draw from the text after the colon (None if there is none) of a spec
PartitionerFactory = Callable[..., Draw]

PARTITIONERS: Registry[PartitionerFactory] = Registry("partitioner")

#: how many seeded redraws a partitioner gets to give every site ``min_size`` samples
MAX_DRAWS = 100


def partition(
    spec: str,
    labels: np.ndarray,
    num_sites: int,
    *,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` over ``num_sites`` sites as ``spec`` says.

    Returns one sorted int64 index array per site; the arrays are disjoint, cover every
    sample exactly once, each hold at least ``min_size`` indices, and depend only on
    ``(spec, labels, num_sites, seed, min_size)``.
    """
    draw = _parse_spec(spec)
    labels = _as_labels(labels)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"partition seed must be a non-negative integer, got {seed!r}")
    num_samples = len(labels)
    if not isinstance(num_sites, (int, np.integer)) or isinstance(num_sites, bool):
        raise ConfigError(f"number of sites must be an integer, got {num_sites!r}")
    if not 1 <= num_sites <= num_samples:
        raise ConfigError(
            f"partition {spec!r}: number of sites must be between 1 and the number of "
            f"samples ({num_samples}), got {num_sites}"
        )
    if min_size < 0 or min_size * num_sites > num_samples:
        raise ConfigError(
            f"partition {spec!r}: cannot give each of {num_sites} sites at least "
            f"{min_size} samples out of {num_samples}"
        )
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(MAX_DRAWS):
        parts = draw(labels, int(num_sites), rng)
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"partition {spec!r} over {num_sites} sites left some site with fewer than "
        f"min_size={min_size} samples in each of {MAX_DRAWS} seeded draws (smallest: "
        f"{smallest}); use a larger parameter (less skew), fewer sites or a smaller "
        f"minimum size"
    )


def assign_like(
    labels: np.ndarray, site_class_counts: np.ndarray | Sequence[Sequence[int]], *, seed: int
) -> list[np.ndarray]:
    """Distribute another split over the sites following each site's label mix.

    ``site_class_counts[k, c]`` is how many samples of class ``c`` site ``k`` holds
    (normally in its training partition).  Each class of ``labels`` is split over the
    sites in proportion to that column, with largest-remainder rounding; a class no
    site holds is split in proportion to the sites' total sizes.

    >>> assign_like(np.array([0, 0, 1, 1]), [[2, 0], [0, 2]], seed=0)
    [array([0, 1]), array([2, 3])]
    """
    labels = _as_labels(labels)
    counts = np.asarray(site_class_counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] < 1 or np.any(counts < 0):
        raise ConfigError(
            "site_class_counts must be a (num_sites, num_classes) array of non-negative "
            f"counts, got shape {counts.shape}"
        )
    num_sites, num_classes = counts.shape
    if len(labels) and labels.max() >= num_classes:
        raise ConfigError(
            f"labels go up to {int(labels.max())} but site_class_counts has only "
            f"{num_classes} classes"
        )
    sizes = counts.sum(axis=1)
    if not sizes.any():
        sizes = np.ones(num_sites)
    rng = np.random.default_rng(seed)
    assigned: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        weights = counts[:, c] if counts[:, c].any() else sizes
        shares = largest_remainder(weights, len(members), rng=rng)
        for site, chunk in enumerate(np.split(members, np.cumsum(shares)[:-1])):
            assigned[site].append(chunk)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in assigned]


def stratified_holdout(
    labels: np.ndarray, fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)`` with ``fraction`` of each class held out.

    The total held out is ``round(fraction * len(labels))``, spread over classes by
    largest remainder, so small sets keep their class mix as well as integers allow.
    """
    labels = _as_labels(labels)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"hold-out fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    hist = np.bincount(labels, minlength=1) if len(labels) else np.zeros(1, np.int64)
    total = int(round(fraction * len(labels)))
    per_class = largest_remainder(hist.astype(np.float64), total, rng=rng)
    held = [
        rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(per_class)
    ]
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).astype(np.int64), held_idx


def class_histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Count of each class ``0..num_classes-1`` in ``labels`` (int64)."""
    labels = _as_labels(labels)
    if len(labels) and labels.max() >= num_classes:
        raise ConfigError(f"label {int(labels.max())} is not below num_classes={num_classes}")
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def largest_remainder(
    weights: np.ndarray, total: int, *, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights``, summing to ``total``.

    Floors first, then gives the leftover units to the largest fractional parts; ties are
    broken at random (by ``rng``) so no index is systematically favoured.

    >>> largest_remainder(np.array([1.0, 1.0, 2.0]), 7).tolist()
    [2, 2, 3]
    """
    weights = np.asarray(weights, dtype=np.float64)
    if total == 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    quotas = weights / weights.sum() * total
    shares = np.floor(quotas).astype(np.int64)
    leftover = total - int(shares.sum())
    if leftover > 0:
        tie_break = rng.random(len(weights)) if rng is not None else np.arange(len(weights))
        order = np.lexsort((tie_break, -(quotas - shares)))
        shares[order[:leftover]] += 1
    return shares


# --- spec parsing -------------------------------------------------------------------


def _parse_spec(spec: str) -> Draw:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"partition spec must be a non-empty string like 'iid' or 'dirichlet:0.5', "
            f"got {spec!r}"
        )
    name, sep, param = spec.strip().partition(":")
    factory = PARTITIONERS.get(name)
    return factory(param if sep else None, spec=spec)


def _positive_float(param: str | None, *, spec: str, expected: str) -> float:
    try:
        value = float(param) if param is not None else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"bad partition spec {spec!r}: expected {expected}")
    return value


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ConfigError(
            f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise ConfigError(f"labels must be non-negative, got {int(labels.min())}")
    return labels


def _split_by_shares(indices: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(shares)[:-1])


# --- partitioners ---------------------------------------------------------------------


@PARTITIONERS.register("iid")
def _iid(param: str | None, *, spec: str) -> Draw:
    if param is not None:
        raise ConfigError(f"bad partition spec {spec!r}: 'iid' takes no parameter")

    def draw(labels: np.ndarray, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
        return np.array_split(rng.permutation(len(labels)), num_sites)

    return draw


@PARTITIONERS.register("dirichlet")
def _dirichlet(param: str | None, *, spec: str) -> Draw:
    alpha = _positive_float(
        param, spec=spec, expected="dirichlet:ALPHA with ALPHA > 0, e.g. dirichlet:0.5"
    )

    def draw(labels: np.ndarray, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = largest_remainder(
                rng.dirichlet(np.full(num_sites, alpha)), len(members), rng=rng
            )
            for site, chunk in enumerate(_split_by_shares(members, shares)):
                parts[site].append(chunk)
        return [np.concatenate(p) for p in parts]

    return draw


@PARTITIONERS.register("quantity")
def _quantity(param: str | None, *, spec: str) -> Draw:
    alpha = _positive_float(
        param, spec=spec, expected="quantity:ALPHA with ALPHA > 0, e.g. quantity:1.0"
    )

    def draw(labels: np.ndarray, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
        shares = largest_remainder(
            rng.dirichlet(np.full(num_sites, alpha)), len(labels), rng=rng
        )
        return _split_by_shares(rng.permutation(len(labels)), shares)

    return draw


@PARTITIONERS.register("classes")
def _classes(param: str | None, *, spec: str) -> Draw:
    expected = "classes:K with K a positive integer, e.g. classes:2"
    if param is None or not param.strip().isdigit() or int(param) < 1:
        raise ConfigError(f"bad partition spec {spec!r}: expected {expected}")
    per_site = int(param)

    def draw(labels: np.ndarray, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
        present = np.unique(labels)
        if per_site > len(present):
            raise ConfigError(
                f"partition {spec!r}: K={per_site} exceeds the {len(present)} classes present"
            )
        if per_site * num_sites < len(present):
            # otherwise some class would have no site and its samples would be dropped
            raise ConfigError(
                f"partition {spec!r}: {num_sites} sites x {per_site} classes cannot cover "
                f"all {len(present)} classes; raise K or the number of sites"
            )
        # Round-robin over a random class order: every class gets an owner, every site
        # gets K distinct classes.
        order = rng.permutation(present)
        owners: dict[int, list[int]] = {int(c): [] for c in present}
        for site in range(num_sites):
            for j in range(per_site):
                owners[int(order[(site * per_site + j) % len(order)])].append(site)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for c, sites in owners.items():
            members = rng.permutation(np.flatnonzero(labels == c))
            for site, chunk in zip(sites, np.array_split(members, len(sites))):
                parts[site].append(chunk)
        return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]

    return draw


@PARTITIONERS.register("natural")
def _natural(param: str | None, *, spec: str) -> Draw:
    # The sites come from a column of the data (see fedsilo.prep.grouping.natural_partition),
    # which labels alone do not carry; registered here so that the spec parses and
    # unknown-name errors list it.
    if param is None or not param.strip():
        raise ConfigError(f"bad partition spec {spec!r}: expected natural:COLUMN, "
                          f"e.g. natural:hospital")

    def draw(labels: np.ndarray, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
        raise ConfigError(
            f"partition {spec!r} takes its sites from the column {param.strip()!r} of a labels "
            f"file; only sources with one (fedsilo prep csv, fedsilo prep dicom --labels) have it"
        )

    return draw
