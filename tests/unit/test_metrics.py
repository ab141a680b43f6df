import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo import metrics


def brute_force_auc(labels, scores):
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=40))
def test_roc_auc_equals_the_pairwise_definition_with_ties(pairs):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=float)  # few values: many ties
    if labels.min() == labels.max():
        assert np.isnan(metrics.roc_auc(labels, scores))
    else:
        assert metrics.roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores))


def test_binary_accuracy_thresholds_positive_probability():
    probs = np.array([[0.4, 0.6], [0.7, 0.3], [0.5, 0.5]])
    assert metrics.accuracy(np.array([1, 0, 1]), probs) == pytest.approx(2 / 3)


def test_multiclass_auc_is_macro_one_vs_rest():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    expected = np.mean([metrics.roc_auc(labels == c, probs[:, c]) for c in range(3)])
    assert metrics.auc(labels, probs) == pytest.approx(expected)
    assert metrics.accuracy(labels, probs) == pytest.approx(0.75)


def test_perfect_and_reversed_scores():
    labels = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
