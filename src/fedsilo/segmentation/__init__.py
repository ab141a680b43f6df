"""Segmentation: dense prediction on image/mask shards (issue 28; docs/segmentation.md).

- ``patches.py``: random, foreground-aware patch crops and augmentation of image and mask
  together (what a training batch is);
- ``loss.py``: Dice + cross-entropy, per sample;
- ``window.py``: sliding-window inference over whole images;
- ``scores.py``: Dice, IoU, pixel AUC and HD95 (numpy and scipy);
- ``task.py``: the task object the roles use (loading, the training loss and transform,
  evaluation), beside classification's.
"""
