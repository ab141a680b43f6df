"""Segmentation scores from predicted and true label maps (numpy; scipy for distances).

- Dice = 2|P∩T| / (|P| + |T|) and IoU = |P∩T| / |P∪T| per class, from counts summed over
  all test pixels (the pixel F1 of vessel-segmentation papers, e.g. the CHASE_DB1 tables);
  a class absent from both prediction and truth scores NaN (nothing to find);
- pixel AUC of the foreground probability (binary tasks);
- HD95: per image and foreground class, the 95th percentile of the distances from each
  boundary pixel of one mask to the nearest boundary pixel of the other, both directions
  pooled (MONAI's ``compute_hausdorff_distance(percentile=95)``), in pixels, averaged over
  the images where both masks have the class (NaN where none has).
"""

from __future__ import annotations

import numpy as np


def confusion(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts: row = true class, column = predicted.

    >>> confusion(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    index = true.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def dice_iou(counts: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-class Dice and IoU from a confusion matrix.

    >>> dice_iou(np.array([[1, 1], [0, 1]]))
    ([0.6666666666666666, 0.6666666666666666], [0.5, 0.5])
    """
    tp = np.diag(counts).astype(np.float64)
    fp = counts.sum(0) - tp
    fn = counts.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return dice.tolist(), iou.tolist()


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image edge counts as outside)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, true: np.ndarray) -> float:
    """HD95 in pixels between two boolean masks; NaN if either is empty.

    >>> a = np.zeros((5, 5), bool); a[1:4, 1:4] = True
    >>> b = np.zeros((5, 5), bool); b[1:4, 2:5] = True
    >>> hd95(a, a), hd95(a, b)
    (0.0, 1.0)
    """
    from scipy import ndimage

    if not pred.any() or not true.any():
        return float("nan")
    bp, bt = boundary(pred), boundary(true)
    to_true = ndimage.distance_transform_edt(~bt)
    to_pred = ndimage.distance_transform_edt(~bp)
    distances = np.concatenate([to_true[bp], to_pred[bt]])
    return float(np.percentile(distances, 95))


def pixel_auc(probs: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC of foreground probabilities against boolean truth (Mann-Whitney, ties
    averaged), exactly, by sorting; NaN when one class is absent.

    >>> pixel_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    0.75
    """
    from scipy.stats import rankdata

    probs, truth = np.asarray(probs, np.float64).ravel(), np.asarray(truth, bool).ravel()
    positives = int(truth.sum())
    negatives = truth.size - positives
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(probs)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))
