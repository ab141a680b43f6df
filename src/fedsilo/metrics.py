"""Classification metrics as MedMNIST v2 reports them (Yang et al., Sci. Data 2023): pure numpy.

- accuracy: binary tasks threshold the positive-class probability at 0.5, others take argmax;
- AUC: binary tasks use the positive-class score; multi-class tasks average the one-vs-rest
  ROC AUC over classes (macro).  AUC is the Mann–Whitney statistic, ties counted as ½.

>>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
0.75
"""

from __future__ import annotations

import numpy as np


def _rankdata(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties sharing the mean rank, like scipy's ``rankdata``."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    mean_ranks = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mean_ranks, ends - starts)
    return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of binary ``labels`` (0/1) against ``scores``; NaN if one class is absent."""
    labels = np.asarray(labels).astype(bool)
    num_pos = int(labels.sum())
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = _rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    labels = np.asarray(labels)
    if probs.shape[1] == 2:
        predicted = (probs[:, 1] > 0.5).astype(labels.dtype)
    else:
        predicted = probs.argmax(axis=1)
    return float((predicted == labels).mean()) if labels.size else float("nan")


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """MedMNIST AUC: positive-class score for 2 classes, macro one-vs-rest otherwise."""
    labels = np.asarray(labels)
    if probs.shape[1] == 2:
        return roc_auc(labels == 1, probs[:, 1])
    per_class = [roc_auc(labels == c, probs[:, c]) for c in range(probs.shape[1])]
    present = [a for a in per_class if not np.isnan(a)]
    return float(np.mean(present)) if present else float("nan")
