"""Planning record splits: natural sites, patient groups, test split modes (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.errors import ConfigError, DataError
from fedsilo.prep.grouping import group_holdout, group_labels, group_partition, natural_partition
from fedsilo.prep.partition import partition, stratified_holdout
from fedsilo.prep.plan import patient_groups, plan_splits

SPECS = ["iid", "dirichlet:0.5", "quantity:2", "classes:1", "classes:2"]


@st.composite
def records(draw, *, natural: bool):
    """Labels, patient ids (each patient has one label), optional site values, options."""
    num_classes = draw(st.integers(2, 4))
    num_patients = draw(st.integers(12, 40))
    patient_label = draw(st.lists(st.integers(0, num_classes - 1), min_size=num_patients,
                                  max_size=num_patients))
    num_sites = draw(st.integers(1, 4))
    patient_site = draw(st.lists(st.integers(0, num_sites - 1), min_size=num_patients,
                                 max_size=num_patients))
    sizes = draw(st.lists(st.integers(1, 4), min_size=num_patients, max_size=num_patients))
    patient = np.repeat(np.arange(num_patients), sizes)
    order = np.random.default_rng(draw(st.integers(0, 1000))).permutation(len(patient))
    patient = patient[order]  # a patient's records are scattered through the file
    labels = np.asarray(patient_label)[patient]
    ids = np.array([f"p{p:03d}" for p in patient])
    sites = np.array([f"h{s}" for s in np.asarray(patient_site)[patient]]) if natural else None
    return dict(
        labels=labels, patients=ids, site_values=sites,
        partition="natural:hospital" if natural else draw(st.sampled_from(SPECS)),
        num_sites=None if natural else num_sites,
        test_split=draw(st.sampled_from(["global", "per-site"])),
        seed=draw(st.integers(0, 2**31)),
        val_fraction=draw(st.sampled_from([0.0, 0.1, 0.25])),
        test_fraction=draw(st.sampled_from([0.1, 0.2, 0.3])),
    )


def _plan(case):
    return plan_splits(case["labels"], partition=case["partition"], num_sites=case["num_sites"],
                       seed=case["seed"], val_fraction=case["val_fraction"],
                       test_fraction=case["test_fraction"], test_split=case["test_split"],
                       patients=case["patients"], site_values=case["site_values"])


def _pieces(plan):
    """Every (site, split) piece of the plan, plus the test set, as index arrays."""
    pieces = {("test", -1): plan.test}
    for k, (train, val) in enumerate(zip(plan.site_train, plan.site_val)):
        pieces[("train", k)], pieces[("val", k)] = train, val
    return pieces


def _try_plan(case):
    try:
        return _plan(case)
    except (ConfigError, DataError) as exc:
        # infeasible draws: too few patients for the sites or a hold-out that empties a site
        assert any(w in str(exc) for w in ("site", "classes", "min_size", "groups")), exc
        return None


@settings(max_examples=60, deadline=None)
@given(st.one_of(records(natural=False), records(natural=True)))
def test_every_record_lands_once_and_no_patient_crosses_a_split_or_site(case):
    plan = _try_plan(case)
    if plan is None:
        return
    pieces = _pieces(plan)
    everything = np.concatenate(list(pieces.values()))
    assert np.array_equal(np.sort(everything), np.arange(len(case["labels"])))
    owner = {}
    for key, idx in pieces.items():
        for patient in set(case["patients"][idx].tolist()):
            assert patient not in owner, f"patient {patient} in {owner.get(patient)} and {key}"
            owner[patient] = key
    assert all(len(t) > 0 for t in plan.site_train)
    again = _plan(case)
    assert all(np.array_equal(a, b)
               for a, b in zip(_pieces(plan).values(), _pieces(again).values()))


@settings(max_examples=40, deadline=None)
@given(records(natural=True))
def test_natural_sites_hold_only_their_own_column_value(case):
    plan = _try_plan(case)
    if plan is None:
        return
    values = case["site_values"]
    assert list(plan.site_names) == sorted(set(values.tolist()))
    for k, name in enumerate(plan.site_names):
        held = np.concatenate([plan.site_train[k], plan.site_val[k]])
        assert set(values[held].tolist()) == {name}
    if case["test_split"] == "per-site":
        # each site gives the test set its own share: every site with enough patients shows up
        for k, name in enumerate(plan.site_names):
            patients = set(case["patients"][values == name].tolist())
            if round(case["test_fraction"] * len(patients)) >= 1:
                assert name in set(values[plan.test].tolist())


@settings(max_examples=40, deadline=None)
@given(records(natural=False), st.integers(1, 2))
def test_classes_k_sites_see_at_most_k_classes(case, k):
    case = {**case, "partition": f"classes:{k}"}
    plan = _try_plan(case)
    if plan is None:
        return
    for train, val in zip(plan.site_train, plan.site_val):
        # patients have one label each here, so keeping patients together cannot add classes
        assert len(set(case["labels"][np.concatenate([train, val])].tolist())) <= k


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=10, max_size=120), st.integers(0, 10**6),
       st.sampled_from([0.1, 0.3, 0.5]))
def test_without_patients_the_plan_is_the_plain_partition(labels, seed, fraction):
    """No patient column and a global test split: exactly the in-memory pipeline's steps."""
    labels = np.array(labels)
    plan = plan_splits(labels, partition="iid", num_sites=2, seed=seed, val_fraction=0.0,
                       test_fraction=fraction)
    from fedsilo.prep.plan import TEST_STREAM, derive_seed

    pool, test = stratified_holdout(labels, fraction, seed=derive_seed(seed, TEST_STREAM))
    assert np.array_equal(plan.test, test)
    expected = [pool[p] for p in partition("iid", labels[pool], 2, seed=seed)]
    assert all(np.array_equal(a, b) for a, b in zip(plan.site_train, expected))


def test_group_holdout_holds_out_whole_groups_stratified_by_group_label():
    labels = np.array([0] * 30 + [1] * 30)
    groups = np.arange(60) // 3  # 20 patients of 3 records, 10 per class
    kept, held = group_holdout(labels, groups, 0.2, seed=1)
    assert len(held) == 12 and len(kept) == 48  # 4 patients of 3
    assert not set(groups[kept].tolist()) & set(groups[held].tolist())
    assert np.bincount(labels[held]).tolist() == [6, 6]  # 2 patients of each class


def test_group_labels_picks_the_most_frequent_then_smallest_label():
    codes, rep = group_labels(np.array([2, 1, 1, 0, 2, 3, 3]), np.array(list("aaabbcc")))
    assert codes.tolist() == [0, 0, 0, 1, 1, 2, 2] and rep.tolist() == [1, 0, 3]


def test_group_partition_counts_groups_in_its_errors():
    with pytest.raises(ConfigError, match=r"grouped by patient here: 2 groups"):
        group_partition("iid", np.zeros(10, np.int64), np.array([0] * 5 + [1] * 5), 3, seed=0)


def test_natural_partition_sorts_values_as_strings():
    # string order ("10" < "2" < "9") differs from numeric order and from first appearance,
    # so a partition sorted any other way fails here
    names, parts = natural_partition(np.array(["9", "10", "2", "10", "9"]))
    assert names == ["10", "2", "9"] and [p.tolist() for p in parts] == [[1, 3], [2], [0, 4]]


def test_empty_patient_ids_are_patients_of_their_own():
    codes = patient_groups(np.array(["x", "", "x", ""]))
    assert codes[0] == codes[2] and len({codes[1], codes[3], codes[0]}) == 3


def test_plan_errors_name_the_problem():
    labels = np.arange(40) % 2
    sites = np.array(["A", "B"] * 20)
    with pytest.raises(ConfigError, match="2 distinct values .*'A', 'B'.* --sites is 3"):
        plan_splits(labels, partition="natural:hospital", num_sites=3, seed=0, val_fraction=0.1,
                    test_fraction=0.2, site_values=sites)
    with pytest.raises(ConfigError, match="needs the column 'hospital'"):
        plan_splits(labels, partition="natural:hospital", num_sites=None, seed=0,
                    val_fraction=0.1, test_fraction=0.2)
    with pytest.raises(ConfigError, match="needs the number of sites"):
        plan_splits(labels, partition="iid", num_sites=None, seed=0, val_fraction=0.1,
                    test_fraction=0.2)
    with pytest.raises(ConfigError, match="test split must be one of"):
        plan_splits(labels, partition="iid", num_sites=2, seed=0, val_fraction=0.1,
                    test_fraction=0.2, test_split="site")
    patients = np.array([f"p{i % 9}" for i in range(40)])  # p0: rows 0 (A) and 9 (B)
    with pytest.raises(DataError, match="patient 'p0' has records on two sites"):
        plan_splits(labels, partition="natural:hospital", num_sites=None, seed=0,
                    val_fraction=0.1, test_fraction=0.2, site_values=sites, patients=patients)
