"""Dice + cross-entropy, the loss of nnU-Net and of MONAI's ``DiceCELoss`` (Milletari et
al., V-Net, 3DV 2016, for the soft Dice), computed **per sample**: DP-SGD clips each
sample's gradient, so the batch loss must be a sum (or mean) of per-sample terms, and a
Dice over the whole batch is not one.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: keeps the soft Dice defined for a class absent from a patch and from its prediction
SMOOTH = 1e-5


def dice_ce_per_sample(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float = 1.0
                       ) -> torch.Tensor:
    """Each sample's mean pixel cross-entropy plus ``dice_weight`` · (1 − its soft Dice,
    averaged over the foreground classes); logits N x K x H x W, target N x H x W.

    >>> logits = torch.tensor([[[[20.0]], [[-20.0]]]])  # one pixel, confidently class 0
    >>> round(float(dice_ce_per_sample(logits, torch.zeros(1, 1, 1, dtype=torch.long))[0]), 3)
    0.0
    """
    target = target.long()
    ce = F.cross_entropy(logits.float(), target, reduction="none").flatten(1).mean(1)
    if not dice_weight:
        return ce
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + SMOOTH) / (denom + SMOOTH)
    foreground = dice[:, 1:] if logits.shape[1] > 1 else dice
    return ce + dice_weight * (1 - foreground.mean(1))
