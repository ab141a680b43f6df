"""Partitioners: invariants (hypothesis), skew behaviour, spec errors, assign_like."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.errors import ConfigError
from fedsilo.prep.partition import (
    PARTITIONERS,
    assign_like,
    class_histogram,
    largest_remainder,
    partition,
    stratified_holdout,
)

SPECS = ["iid", "dirichlet:0.3", "dirichlet:5", "quantity:1.0", "classes:1", "classes:2"]


@st.composite
def problems(draw):
    """(spec, labels, num_sites, seed) with enough samples for every site."""
    num_classes = draw(st.integers(2, 6))
    num_sites = draw(st.integers(1, 8))
    n = draw(st.integers(num_sites * 4, 300))
    labels = np.array(draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)))
    spec = draw(st.sampled_from(SPECS))
    return spec, labels, num_sites, draw(st.integers(0, 2**31))


def _cover_check(parts: list[np.ndarray], n: int) -> None:
    everything = np.concatenate(parts)
    assert everything.dtype == np.int64
    assert len(everything) == n  # disjoint + covering: each index exactly once
    assert np.array_equal(np.sort(everything), np.arange(n))
    for p in parts:
        assert np.all(np.diff(p) > 0), "each site's indices are sorted and unique"


@settings(max_examples=60, deadline=None)
@given(problems())
def test_every_sample_lands_in_exactly_one_site(problem):
    spec, labels, num_sites, seed = problem
    try:
        parts = partition(spec, labels, num_sites, seed=seed, min_size=0)
    except ConfigError as exc:
        # classes:K legitimately refuses when K sites x classes cannot cover the labels
        assert spec.startswith("classes") and "classes" in str(exc)
        return
    assert len(parts) == num_sites
    _cover_check(parts, len(labels))


@settings(max_examples=40, deadline=None)
@given(problems())
def test_same_seed_same_partition(problem):
    spec, labels, num_sites, seed = problem
    try:
        a = partition(spec, labels, num_sites, seed=seed, min_size=0)
    except ConfigError:
        return
    b = partition(spec, labels.copy(), num_sites, seed=seed, min_size=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 3))
def test_every_site_gets_min_size_or_config_error(problem, min_size):
    spec, labels, num_sites, seed = problem
    try:
        parts = partition(spec, labels, num_sites, seed=seed, min_size=min_size)
    except ConfigError as exc:
        assert spec in str(exc)
        return
    assert min(len(p) for p in parts) >= min_size
    _cover_check(parts, len(labels))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 500), st.integers(1, 20), st.integers(0, 1000))
def test_iid_sizes_differ_by_at_most_one(n, num_sites, seed):
    if num_sites > n:
        return
    parts = partition("iid", np.zeros(n, dtype=np.int64), num_sites, seed=seed)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == n


def test_different_seeds_give_different_partitions():
    labels = np.arange(200) % 4
    a = partition("dirichlet:0.5", labels, 5, seed=0)
    b = partition("dirichlet:0.5", labels, 5, seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def _label_skew(spec: str, seed: int) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    labels = np.arange(3000) % 10
    parts = partition(spec, labels, 10, seed=seed)
    glob = np.full(10, 0.1)
    tv = [0.5 * np.abs(class_histogram(labels[p], 10) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tv))


def test_small_alpha_gives_more_label_skew_than_large_alpha():
    seeds = range(10)
    skew_small = np.mean([_label_skew("dirichlet:0.1", s) for s in seeds])
    skew_large = np.mean([_label_skew("dirichlet:100", s) for s in seeds])
    skew_iid = np.mean([_label_skew("iid", s) for s in seeds])
    # alpha=0.1 concentrates each class on one or two of the 10 sites (TV near 0.7);
    # alpha=100 is within sampling noise of iid (TV well under 0.1)
    assert skew_small > 0.5
    assert skew_large < 0.1
    assert skew_small > 5 * skew_large
    assert abs(skew_large - skew_iid) < 0.05


def test_quantity_skew_varies_sizes_but_not_label_mix():
    labels = np.arange(4000) % 4
    parts = partition("quantity:0.5", labels, 8, seed=3)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 3 * sizes.min()  # a Dirichlet(0.5) draw over 8 sites is lopsided
    big = parts[int(np.argmax(sizes))]
    mix = class_histogram(labels[big], 4) / len(big)
    assert np.all(np.abs(mix - 0.25) < 0.06)  # labels ignored: the biggest site looks iid


def test_classes_partition_gives_each_site_k_classes():
    labels = np.arange(1000) % 5
    parts = partition("classes:2", labels, 6, seed=0)
    for p in parts:
        assert len(np.unique(labels[p])) == 2
    _cover_check(parts, 1000)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("nope:1", "known: classes, dirichlet, iid, natural, quantity"),
        ("natural", "expected natural:COLUMN"),
        ("dirichlet", "dirichlet:ALPHA with ALPHA > 0"),
        ("dirichlet:", "dirichlet:ALPHA with ALPHA > 0"),
        ("dirichlet:-1", "dirichlet:ALPHA with ALPHA > 0"),
        ("dirichlet:abc", "dirichlet:ALPHA with ALPHA > 0"),
        ("dirichlet:nan", "dirichlet:ALPHA with ALPHA > 0"),
        ("quantity:0", "quantity:ALPHA with ALPHA > 0"),
        ("classes:x", "classes:K with K a positive integer"),
        ("classes:0", "classes:K with K a positive integer"),
        ("iid:3", "'iid' takes no parameter"),
        ("", "non-empty string"),
    ],
)
def test_bad_specs_say_what_is_expected(spec, fragment):
    with pytest.raises(ConfigError) as info:
        partition(spec, np.arange(20) % 2, 2, seed=0)
    assert fragment in str(info.value)
    if spec:
        assert repr(spec.split(":")[0]) in str(info.value) or repr(spec) in str(info.value)


@pytest.mark.parametrize("num_sites", [0, -1, 21])
def test_site_count_out_of_range(num_sites):
    with pytest.raises(ConfigError, match=r"number of sites must be between 1 "
                                          r"and the number of samples \(20\)"):
        partition("iid", np.arange(20) % 2, num_sites, seed=0)


def test_unmeetable_min_size_raises_after_bounded_redraws():
    # one class, 10 sites, alpha tiny: some site is almost surely empty on every draw
    labels = np.zeros(50, dtype=np.int64)
    with pytest.raises(ConfigError, match=r"fewer than min_size=4 samples in each of 100"):
        partition("dirichlet:0.01", labels, 10, seed=0, min_size=4)
    with pytest.raises(ConfigError, match="cannot give each of 10 sites at least 6"):
        partition("iid", labels, 10, seed=0, min_size=6)


def test_classes_that_cannot_cover_all_labels_is_refused():
    with pytest.raises(ConfigError, match="cannot cover all 6 classes"):
        partition("classes:1", np.arange(60) % 6, 3, seed=0)
    with pytest.raises(ConfigError, match="K=3 exceeds the 2 classes"):
        partition("classes:3", np.arange(60) % 2, 3, seed=0)


def test_registry_lists_the_partitioners():
    assert PARTITIONERS.names() == ["classes", "dirichlet", "iid", "natural", "quantity"]


def test_natural_needs_a_column_of_site_values():
    # labels alone carry no site column: the record pipeline (fedsilo.prep.plan) does natural
    with pytest.raises(ConfigError, match="takes its sites from the column 'hospital'"):
        partition("natural:hospital", np.arange(20) % 2, 2, seed=0)


def test_bad_labels_and_seed():
    with pytest.raises(ConfigError, match="1-D integer"):
        partition("iid", np.zeros((4, 2), dtype=np.int64), 2, seed=0)
    with pytest.raises(ConfigError, match="1-D integer"):
        partition("iid", np.zeros(4), 2, seed=0)
    with pytest.raises(ConfigError, match="non-negative"):
        partition("iid", np.array([0, -1, 1, 0]), 2, seed=0)
    with pytest.raises(ConfigError, match="seed must be a non-negative integer"):
        partition("iid", np.arange(4), 2, seed=-3)


# --- assign_like, holdout, helpers ------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 50), min_size=3, max_size=3), min_size=1, max_size=6),
    st.lists(st.integers(0, 2), min_size=0, max_size=200),
    st.integers(0, 1000),
)
def test_assign_like_is_disjoint_covering_and_proportional(counts, labels, seed):
    counts = np.array(counts)
    labels = np.array(labels, dtype=np.int64)
    parts = assign_like(labels, counts, seed=seed)
    assert len(parts) == len(counts)
    _cover_check(parts, len(labels))
    sizes = counts.sum(axis=1)
    for c in range(3):
        n_c = int((labels == c).sum())
        weights = (counts[:, c] if counts[:, c].any()
                   else (sizes if sizes.any() else np.ones(len(counts))))
        expected = weights / weights.sum() * n_c
        got = np.array([int((labels[p] == c).sum()) for p in parts])
        assert np.all(np.abs(got - expected) < 1.0)  # largest remainder: off by < 1
        assert got.sum() == n_c
    again = assign_like(labels, counts, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_assign_like_follows_each_sites_label_mix():
    labels = np.arange(100) % 2
    parts = assign_like(labels, [[90, 10], [10, 90]], seed=0)
    assert class_histogram(labels[parts[0]], 2).tolist() == [45, 5]
    assert class_histogram(labels[parts[1]], 2).tolist() == [5, 45]


def test_assign_like_rejects_labels_beyond_counts():
    with pytest.raises(ConfigError, match="only 2 classes"):
        assign_like(np.array([0, 1, 2]), [[1, 1]], seed=0)


def test_stratified_holdout_keeps_class_mix():
    labels = np.array([0] * 300 + [1] * 100)
    keep, held = stratified_holdout(labels, 0.1, seed=0)
    assert len(held) == 40 and len(keep) == 360
    assert class_histogram(labels[held], 2).tolist() == [30, 10]
    assert not set(keep.tolist()) & set(held.tolist())
    again = stratified_holdout(labels, 0.1, seed=0)
    assert np.array_equal(again[1], held)


def test_largest_remainder_sums_exactly():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.random(7)
        total = int(rng.integers(0, 1000))
        shares = largest_remainder(w, total, rng=rng)
        assert shares.sum() == total
        assert np.all(np.abs(shares - w / w.sum() * total) < 1.0)


def test_class_histogram():
    assert class_histogram(np.array([0, 2, 2]), 4).tolist() == [1, 0, 2, 0]
    with pytest.raises(ConfigError, match="num_classes=2"):
        class_histogram(np.array([0, 2]), 2)
