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
    ts = np.asarray(counts.get("thresholds", grid()), dtype=np.float64)[: len(score)]
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(ts[best[np.argmin(np.abs(ts[best] - 0.5))]])


def resolve_best_by(best_by: str, *, private: bool, noised: bool = False) -> str | None:
    """The metric model selection uses (None: no selection).  ``noised``: under DP, the
    sites release noised validation histograms (``dp.validation``): auto is val_auc then.

    >>> resolve_best_by("auto", private=False), resolve_best_by("auto", private=True)
    ('val_loss', None)
    >>> resolve_best_by("auto", private=True, noised=True)
    'val_auc'
    """
    if best_by == "none" or (best_by == "auto" and private and not noised):
        return None
    if best_by == "auto":
        return "val_auc" if private else "val_loss"
    return best_by


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


# -- validation under DP (dp.validation; docs/privacy.md, "Validation under DP") ------------
#
# A site releases the histogram of its validation scores, one count per (class, bin) of
# equal-width bins of the positive-class probability, each count plus N(0, σ²) from its
# secret.  Adding or removing one validation example moves exactly one count by 1, so the
# release is the Gaussian mechanism with L2 sensitivity 1 and noise multiplier σ.  Everything
# the coordinator derives (the sum over sites, cumulative counts, AUC, accuracy, a
# threshold) is post-processing of those noised counts.


def histogram_edges(bins: int) -> np.ndarray:
    """The bin edges 0, 1/bins, ..., 1 of the positive-class probability."""
    return np.round(np.linspace(0.0, 1.0, bins + 1), 6)


def score_histogram(labels: np.ndarray, probs: np.ndarray, *, bins: int) -> dict[str, Any]:
    """Exact counts of validation examples per class and bin: bin k holds p in
    (edge_k, edge_k+1] (bin 0 also p <= 0), so "p > edge_j" is the sum of bins j..bins-1.

    >>> h = score_histogram(np.array([0, 0, 1, 1]), np.array([0.05, 0.3, 0.35, 0.9]), bins=4)
    >>> h["pos"], h["neg"]
    ([0, 1, 0, 1], [1, 1, 0, 0])
    """
    scores = np.asarray(probs, dtype=np.float64)
    if scores.ndim == 2:
        scores = scores[:, 1]
    edges = histogram_edges(bins)
    index = np.clip(np.searchsorted(edges, scores, side="left") - 1, 0, bins - 1)
    positive = np.asarray(labels) == 1
    return {"pos": [int(v) for v in np.bincount(index[positive], minlength=bins)],
            "neg": [int(v) for v in np.bincount(index[~positive], minlength=bins)]}


def histogram_from_edge_counts(counts: Mapping[str, Any]) -> dict[str, Any]:
    """The histogram of :func:`score_histogram` from :func:`threshold_counts` at the edges
    (0, 1/bins, ..., 1): bin k holds what is above edge k but not above edge k+1.

    >>> labels, probs = np.array([0, 0, 1, 1]), np.array([0.05, 0.3, 0.35, 0.9])
    >>> histogram_from_edge_counts(threshold_counts(labels, probs, histogram_edges(4)))
    {'pos': [0, 1, 0, 1], 'neg': [1, 1, 0, 0]}
    """
    out = {}
    for key, name in (("pos", "tp"), ("neg", "fp")):
        above = np.asarray(counts[name], dtype=np.int64)
        bins = np.append(above[1:-1], 0)  # above edge 1 .. bins-1, and above 1: none
        upper = np.concatenate([[int(counts[key])], above[1:-1]])
        out[key] = [int(v) for v in upper - bins]
    return out


def sum_histograms(hists: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, Any] | None:
    """The sites' (noised) histograms added up, or None when there are none."""
    if not hists:
        return None
    sizes = {len(h["pos"]) for h in hists} | {len(h["neg"]) for h in hists}
    if len(sizes) != 1:
        raise ValueError(f"validation histograms of different sizes: {sorted(sizes)}")
    return {"pos": [float(v) for v in np.sum([h["pos"] for h in hists], axis=0)],
            "neg": [float(v) for v in np.sum([h["neg"] for h in hists], axis=0)]}


def counts_from_histogram(hist: Mapping[str, Sequence[float]] | None) -> dict[str, Any] | None:
    """The confusion counts at the interior edges (``thresholds``) of a noised histogram:
    positives above each edge, clamped to [0, the class total] and made non-increasing in
    the threshold (post-processing: it changes no guarantee).  None without a histogram.

    >>> c = counts_from_histogram({"pos": [0, 1, 0, 1], "neg": [1, 1, 0, 0]})
    >>> c["thresholds"], c["tp"], c["fp"], c["pos"], c["neg"]
    ([0.25, 0.5, 0.75], [2.0, 1.0, 1.0], [1.0, 0.0, 0.0], 2.0, 2.0)
    """
    if hist is None:
        return None
    out: dict[str, Any] = {"thresholds": [float(t) for t in histogram_edges(len(hist["pos"]))
                                          [1:-1]]}
    for key, name in (("pos", "tp"), ("neg", "fp")):
        values = np.asarray(hist[key], dtype=np.float64)
        total = max(0.0, float(values.sum()))
        above = np.cumsum(values[::-1])[::-1][1:]  # p > edge_j, j = 1 .. bins-1
        above = np.minimum.accumulate(np.clip(above, 0.0, total))
        out[name], out[key] = [float(v) for v in above], total
    return out


def metrics_from_counts(counts: Mapping[str, Any] | None) -> dict[str, float]:
    """Pooled validation figures from confusion counts: ``auc`` (the trapezoids of the ROC
    curve through the counts' thresholds), ``acc`` at the threshold nearest 0.5, and
    ``num_samples``; {} when a class is missing (no ROC curve).

    >>> m = metrics_from_counts(counts_from_histogram({"pos": [0, 1, 0, 1], "neg": [1, 1, 0, 0]}))
    >>> m["auc"], m["acc"], m["num_samples"]
    (0.875, 0.75, 4.0)
    """
    if counts is None or counts["pos"] <= 0 or counts["neg"] <= 0:
        return {}
    pos, neg = float(counts["pos"]), float(counts["neg"])
    tpr = np.concatenate([[1.0], np.asarray(counts["tp"], np.float64) / pos, [0.0]])
    fpr = np.concatenate([[1.0], np.asarray(counts["fp"], np.float64) / neg, [0.0]])
    auc = float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0))
    ts = np.asarray(counts.get("thresholds", grid()), dtype=np.float64)
    j = int(np.argmin(np.abs(ts - 0.5)))
    acc = (float(counts["tp"][j]) + neg - float(counts["fp"][j])) / (pos + neg)
    return {"acc": acc, "auc": auc, "num_samples": pos + neg}
