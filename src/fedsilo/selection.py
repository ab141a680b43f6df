"""Model selection on federated validation, and a decision threshold chosen the same way:
pure numpy, no torch, no MPI.

Each participant validates the global model it receives on its own val split
(``aggregate.weighted_validation`` pools the figures); :class:`BestModel` keeps the global
model whose pooled figure is the best so far.  Nothing here reads the test set, so the
test metrics of the selected model stay an unbiased estimate (the point of a validation
split: Hastie, Tibshirani & Friedman, *Elements of Statistical Learning*, §7.2).

A threshold needs more than a site's accuracy: it needs the whole ROC curve.  Rather than
per-sample scores, each site sends its confusion counts at a fixed grid of
:data:`NUM_THRESHOLDS` thresholds; the coordinator adds them up, so the chosen threshold is
what the pooled validation sets would give at the grid's resolution (0.01).

>>> counts = threshold_counts(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.8]))
>>> counts["pos"], counts["neg"], counts["tp"][25], counts["fp"][25], counts["fp"][15]
(2, 2, 2, 0, 1)
>>> choose_threshold(counts, rule="youden")  # every t in [0.20, 0.29] separates them
0.29
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

#: the threshold grid: 0.00, 0.01, ..., 1.00; "positive" means p(positive class) > t, so
#: t = 0.5 is the default decision of :func:`fedsilo.metrics.accuracy`
NUM_THRESHOLDS = 101
#: metric -> whether larger is better
DIRECTIONS = {"val_loss": False, "val_acc": True, "val_auc": True}


def grid() -> np.ndarray:
    return np.round(np.linspace(0.0, 1.0, NUM_THRESHOLDS), 2)


def threshold_grid(rule: str, num_classes: int) -> np.ndarray | None:
    """The grid a site counts at, or None when no threshold is asked for (``rule`` none)
    or the task is not binary."""
    return grid() if rule != "none" and num_classes == 2 else None


def threshold_counts(labels: np.ndarray, probs: np.ndarray,
                     thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """True and false positives at each threshold of the positive-class probability
    (``probs``: (N,) scores, or (N, 2) probabilities), and the numbers of positives and
    negatives: the sufficient statistics of an ROC curve on the grid, as plain ints."""
    scores = np.asarray(probs, dtype=np.float64)
    if scores.ndim == 2:
        scores = scores[:, 1]
    positive = np.asarray(labels) == 1
    ts = grid() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    above = scores[None, :] > ts[:, None]
    return {"tp": [int(v) for v in (above & positive).sum(axis=1)],
            "fp": [int(v) for v in (above & ~positive).sum(axis=1)],
            "pos": int(positive.sum()), "neg": int((~positive).sum())}


def sum_counts(counts: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The sites' counts added up (None when there are none)."""
    if not counts:
        return None
    return {"tp": [int(v) for v in np.sum([c["tp"] for c in counts], axis=0)],
            "fp": [int(v) for v in np.sum([c["fp"] for c in counts], axis=0)],
            "pos": sum(int(c["pos"]) for c in counts), "neg": sum(int(c["neg"]) for c in counts)}


def choose_threshold(counts: Mapping[str, Any] | None, *, rule: str) -> float | None:
    """The grid threshold that maximises ``rule`` (youden: TPR − FPR, the balanced accuracy
    up to an affine map; accuracy: (TP + TN) / N) on ``counts``; among ties, the one closest
    to 0.5.  None when ``rule`` is none, or the counts lack a class (no ROC curve then)."""
    if rule == "none" or counts is None or not counts["pos"] or not counts["neg"]:
        return None
    tp, fp = np.asarray(counts["tp"], dtype=np.float64), np.asarray(counts["fp"], np.float64)
    pos, neg = float(counts["pos"]), float(counts["neg"])
    if rule == "youden":
        score = tp / pos - fp / neg
    elif rule == "accuracy":
        score = (tp + (neg - fp)) / (pos + neg)
    else:
        raise ValueError(f"unknown threshold rule {rule!r}")
    ts = grid()[: len(score)]
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(ts[best[np.argmin(np.abs(ts[best] - 0.5))]])


def resolve_best_by(best_by: str, *, private: bool) -> str | None:
    """The metric model selection uses (None: no selection).

    >>> resolve_best_by("auto", private=False), resolve_best_by("auto", private=True)
    ('val_loss', None)
    """
    if best_by == "none" or (best_by == "auto" and private):
        return None
    return "val_loss" if best_by == "auto" else best_by


def metric_value(val: Mapping[str, Any] | None, metric: str) -> float | None:
    """``metric`` (val_loss, val_acc, val_auc) of a pooled validation, or None when the
    round has none (no site validated, or AUC undefined on every site)."""
    if not val:
        return None
    value = val.get(metric.removeprefix("val_"))
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


class BestModel:
    """The best global model so far by one federated validation metric.

    ``offer`` is called with each validated global model (the model *after* round
    ``round``); a strictly better value replaces the kept one, so among equals the earliest
    model stays.  The state travels in the coordinator's checkpoint, so ``--resume`` keeps
    the best so far.

    >>> best = BestModel("val_acc")
    >>> best.offer(1, {"acc": 0.7}, np.zeros(2, np.float32)), best.offer(2, {"acc": 0.7}, None)
    (True, False)
    >>> best.round, best.value
    (1, 0.7)
    """

    def __init__(self, metric: str) -> None:
        if metric not in DIRECTIONS:
            raise ValueError(f"unknown selection metric {metric!r}; known: {sorted(DIRECTIONS)}")
        self.metric = metric
        self.higher_is_better = DIRECTIONS[metric]
        self.round: int | None = None
        self.value: float | None = None
        self.val: dict[str, Any] | None = None
        self.counts: dict[str, Any] | None = None
        self.weights: np.ndarray | None = None

    def better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.higher_is_better else value < self.value

    def offer(self, round_index: int, val: Mapping[str, Any] | None, weights: Any, *,
              counts: Mapping[str, Any] | None = None) -> bool:
        """Keep (a copy of) ``weights`` if ``val`` is the best so far; True if kept."""
        value = metric_value(val, self.metric)
        if value is None or not self.better(value):
            return False
        self.round, self.value = round_index, value
        self.val = dict(val or {})
        self.counts = None if counts is None else dict(counts)
        self.weights = np.array(weights, dtype=np.float32, copy=True)
        return True

    def record(self) -> dict[str, Any] | None:
        """``summary.json``'s ``best`` (without the threshold), or None before any."""
        if self.round is None:
            return None
        return {"round": self.round, "metric": self.metric, "value": self.value,
                "val": self.val}

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps: JSON-able metadata, and the weights (or None)."""
        return {"meta": {"metric": self.metric, "round": self.round, "value": self.value,
                         "val": self.val, "counts": self.counts},
                "weights": self.weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        meta = state["meta"]
        if meta.get("metric") != self.metric:
            return  # the run now selects by another metric: start afresh
        self.round, self.value = meta["round"], meta["value"]
        self.val, self.counts = meta["val"], meta["counts"]
        weights = state.get("weights")
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
