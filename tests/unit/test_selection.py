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
    grid,
    resolve_best_by,
    sum_counts,
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
    load_config(None, overrides=["dp.enabled=true"])  # auto: off, no error
    for key in ("checkpoint.best_by=val_auc", "checkpoint.threshold=youden"):
        with pytest.raises(ConfigError, match="under DP no site releases validation"):
            load_config(None, overrides=["dp.enabled=true", key])
    with pytest.raises(ConfigError, match="checkpoint.best_by"):
        load_config(None, overrides=["checkpoint.best_by=test_acc"])
