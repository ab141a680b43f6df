"""Model selection and thresholds (``fedsilo.selection``): pure numpy, no MPI."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.config import load_config
from fedsilo.errors import ConfigError
from fedsilo.selection import (
    BestModel,
    choose_threshold,
    counts_from_histogram,
    grid,
    histogram_edges,
    histogram_from_edge_counts,
    metrics_from_counts,
    resolve_best_by,
    score_histogram,
    sum_counts,
    sum_histograms,
    threshold_counts,
)

scores_and_labels = st.lists(
    st.tuples(st.floats(0, 1, allow_nan=False), st.integers(0, 1)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(scores_and_labels, st.integers(0, 60))
def test_summed_site_counts_are_the_pooled_counts(pairs, cut) -> None:
    """What the coordinator sums is what one pooled validation set would count."""
    scores = np.array([s for s, _ in pairs])
    labels = np.array([y for _, y in pairs])
    cut = min(cut, len(pairs))
    sites = [threshold_counts(labels[:cut], scores[:cut]),
             threshold_counts(labels[cut:], scores[cut:])]
    assert sum_counts(sites) == threshold_counts(labels, scores)


@settings(max_examples=60, deadline=None)
@given(scores_and_labels)
def test_the_chosen_threshold_is_the_best_on_the_grid(pairs) -> None:
    scores = np.array([s for s, _ in pairs])
    labels = np.array([y for _, y in pairs])
    counts = threshold_counts(labels, scores)
    for rule in ("youden", "accuracy"):
        t = choose_threshold(counts, rule=rule)
        if labels.all() or not labels.any():
            assert t is None  # no ROC curve with one class
            continue
        def score(threshold: float) -> float:
            predicted = scores > threshold
            tpr = (predicted & (labels == 1)).sum() / (labels == 1).sum()
            fpr = (predicted & (labels == 0)).sum() / (labels == 0).sum()
            return tpr - fpr if rule == "youden" else (predicted == labels).mean()
        assert t in grid().tolist()
        assert score(t) >= max(score(g) for g in grid()) - 1e-12


def test_choose_threshold_off_and_ties_near_one_half() -> None:
    counts = threshold_counts(np.array([0, 1]), np.array([0.1, 0.9]))
    assert choose_threshold(counts, rule="none") is None
    assert choose_threshold(counts, rule="youden") == 0.5  # every t in [0.10, 0.89] separates


def test_best_model_keeps_the_first_strictly_better_and_round_trips() -> None:
    best = BestModel("val_loss")
    assert not best.offer(1, {}, np.zeros(3))  # a round without validation
    assert best.offer(1, {"loss": 0.5}, np.ones(3, np.float32))
    assert not best.offer(2, {"loss": 0.5}, np.zeros(3, np.float32))
    assert best.offer(3, {"loss": 0.4}, np.full(3, 3, np.float32), counts={"pos": 1})
    assert not best.offer(4, {"loss": float("nan")}, np.zeros(3))
    assert best.record() == {"round": 3, "metric": "val_loss", "value": 0.4,
                             "val": {"loss": 0.4}}
    again = BestModel("val_loss")
    again.load_state_dict(best.state_dict())
    assert again.record() == best.record() and np.array_equal(again.weights, best.weights)
    other = BestModel("val_auc")
    other.load_state_dict(best.state_dict())  # another metric now: selection starts afresh
    assert other.record() is None
    auc = BestModel("val_auc")
    assert auc.offer(1, {"auc": 0.7}, np.zeros(1)) and not auc.offer(2, {"auc": 0.6}, None)


def test_selection_under_dp() -> None:
    assert resolve_best_by("auto", private=True) is None
    assert resolve_best_by("val_acc", private=False) == "val_acc"
    assert resolve_best_by("auto", private=True, noised=True) == "val_auc"
    load_config(None, overrides=["dp.enabled=true"])  # auto: off, no error
    for key in ("checkpoint.best_by=val_auc", "checkpoint.threshold=youden"):
        with pytest.raises(ConfigError, match="under DP no site releases validation"):
            load_config(None, overrides=["dp.enabled=true", key])
        # with noised validation both are offered
        load_config(None, overrides=["dp.enabled=true", "dp.validation.enabled=true", key])
    with pytest.raises(ConfigError, match="no loss follows"):
        load_config(None, overrides=["dp.enabled=true", "dp.validation.enabled=true",
                                     "checkpoint.best_by=val_loss"])
    with pytest.raises(ConfigError, match="needs dp.enabled=true"):
        load_config(None, overrides=["dp.validation.enabled=true"])
    with pytest.raises(ConfigError, match="dp.validation.bins"):
        load_config(None, overrides=["dp.validation.bins=1"])
    with pytest.raises(ConfigError, match="checkpoint.best_by"):
        load_config(None, overrides=["checkpoint.best_by=test_acc"])


# -- validation under DP: histograms ---------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(scores_and_labels, st.integers(2, 20))
def test_histogram_counts_are_the_exact_counts_at_its_edges(pairs, bins) -> None:
    """Without noise, the counts the coordinator derives from a histogram are exactly the
    confusion counts at the bin edges, and its AUC that of the binned scores."""
    scores = np.array([s for s, _ in pairs])
    labels = np.array([y for _, y in pairs])
    edges = histogram_edges(bins)
    hist = score_histogram(labels, scores, bins=bins)
    assert hist == histogram_from_edge_counts(threshold_counts(labels, scores, edges))
    counts = counts_from_histogram(hist)
    exact = threshold_counts(labels, scores, edges[1:-1])
    assert counts["tp"] == exact["tp"] and counts["fp"] == exact["fp"]
    assert (counts["pos"], counts["neg"]) == (exact["pos"], exact["neg"])
    m = metrics_from_counts(counts)
    if exact["pos"] and exact["neg"]:
        binned = np.clip(np.searchsorted(edges, scores, side="left") - 1, 0, bins - 1)
        pos, neg = binned[labels == 1], binned[labels == 0]
        pairs_auc = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
        assert m["auc"] == pytest.approx(float(pairs_auc.mean()))
        assert m["num_samples"] == len(pairs)
    else:
        assert m == {}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-30, 60), min_size=8, max_size=8), min_size=1, max_size=4))
def test_noised_histograms_give_sane_counts(rows) -> None:
    """Noised counts may be negative or inconsistent; what the coordinator derives stays a
    valid ROC: counts in [0, total], non-increasing in the threshold, AUC in [0, 1]."""
    hists = [{"pos": r[:4], "neg": r[4:]} for r in rows]
    counts = counts_from_histogram(sum_histograms(hists))
    for key, total in (("tp", "pos"), ("fp", "neg")):
        values = np.array(counts[key])
        assert (values >= 0).all() and (values <= counts[total]).all()
        assert (np.diff(values) <= 0).all()
    m = metrics_from_counts(counts)
    if m:
        assert 0 <= m["auc"] <= 1 and 0 <= m["acc"] <= 1
    t = choose_threshold(counts, rule="youden")
    assert t is None or t in counts["thresholds"]


def test_sum_histograms_refuses_different_bins() -> None:
    with pytest.raises(ValueError, match="different sizes"):
        sum_histograms([{"pos": [1, 2], "neg": [0, 1]}, {"pos": [1, 2, 3], "neg": [0, 1, 2]}])
