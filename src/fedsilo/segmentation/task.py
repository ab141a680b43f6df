"""The segmentation task: splits of whole images with their label maps, patch batches for
training, Dice + cross-entropy, and sliding-window evaluation (see ``tasks.py``).

A split is held in memory (:class:`SegSplit`) or streamed from its shard
(:class:`StreamedSegSplit`), as ``data.in_memory`` decides for classification
(``loading.py``, counting the label maps beside the pixels).  Both give the same batches
bit for bit: the whole images and label maps of a batch, in its order, cut into patches by
the same transform drawing from the same generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fedsilo.config import DataConfig, SegmentationConfig
from fedsilo.errors import DataError, ShardError
from fedsilo.loading import (
    Batches,
    Transform,
    WindowReader,
    channel_stat,
    in_order,
    normalize,
    plan_loading,
)
from fedsilo.segmentation import scores
from fedsilo.segmentation.loss import dice_ce_per_sample
from fedsilo.segmentation.patches import augment_pair, crop_patches
from fedsilo.segmentation.window import sliding_window
from fedsilo.shards import MaskReader, SplitReader, read_masks


@dataclass(frozen=True)
class SegSplit:
    """A segmentation split in memory: raw images (uint8 N x C x H x W), label maps (uint8
    N x H x W) and each image's highest class (``labels``, what sampling counts)."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    patch_size: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def sample(self, count: int) -> torch.Tensor:
        """The centre patches of the first ``count`` images, normalized (model checks)."""
        return _centre_patches(self.images[:count], self.patch_size, self.mean, self.std)

    def batches(self, indexes: Iterable[Any], *, transform: Transform | None = None
                ) -> Batches:
        """For each index batch, (normalized images, int64 label maps): whole images, or
        what ``transform`` (training: patches) makes of them."""
        device = self.labels.device
        for index in indexes:
            index = torch.as_tensor(index, dtype=torch.long).to(device)
            pixels, masks = self.images[index], self.masks[index]
            if transform is not None:
                pixels, masks = transform(pixels, masks)
            yield normalize(pixels, self.mean, self.std), masks.long()


def _centre_patches(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor
                    ) -> torch.Tensor:
    pad_h, pad_w = max(0, size - images.shape[-2]), max(0, size - images.shape[-1])
    images = torch.nn.functional.pad(images, (0, pad_w, 0, pad_h))
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return normalize(images[..., top: top + size, left: left + size], mean, std)


class StreamedSegSplit:
    """A segmentation split read from its shard a window of batches at a time: only the
    labels stay in memory; a reader thread reads the whole images and label maps of the
    upcoming batches (``loading.WindowReader``), and each batch is cut into patches as it
    is consumed."""

    def __init__(self, reader: SplitReader, *, mean: Any, std: Any, device: torch.device,
                 window_bytes: int, patch_size: int) -> None:
        self.reader, self.device, self.patch_size = reader, device, patch_size
        self.masks = MaskReader(reader.path, reader.split)
        if self.masks.num_samples != reader.num_samples:
            self.close()
            raise ShardError(f"{reader.where}: {self.masks.num_samples} masks for "
                             f"{reader.num_samples} images")
        self.labels = torch.from_numpy(reader.labels()).to(device)
        self.mean, self.std = channel_stat(mean, device), channel_stat(std, device)
        self.window_rows = max(1, int(window_bytes) // (reader.row_bytes + self.masks.map_bytes))

    def __len__(self) -> int:
        return self.reader.num_samples

    def _read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.reader.read(rows), self.masks.read(rows)

    def sample(self, count: int) -> torch.Tensor:
        try:
            images, _ = self._read(np.arange(min(count, len(self))))
        except ShardError as exc:
            raise DataError(f"the shard became unreadable while in use: {exc}") from exc
        return _centre_patches(torch.from_numpy(images).to(self.device), self.patch_size,
                               self.mean, self.std)

    def batches(self, indexes: Iterable[Any], *, transform: Transform | None = None
                ) -> Batches:
        """As :meth:`SegSplit.batches`, read from the shard."""
        windows = WindowReader(self._read, indexes, max_rows=self.window_rows)
        try:
            for batch_indexes, unique, (images, masks) in windows:
                for index in batch_indexes:
                    where = np.searchsorted(unique, index)
                    pixels = torch.from_numpy(np.take(images, where, axis=0)).to(self.device)
                    maps = torch.from_numpy(np.take(masks, where, axis=0)).to(self.device)
                    if transform is not None:
                        pixels, maps = transform(pixels, maps)
                    yield normalize(pixels, self.mean, self.std), maps.long()
        except ShardError as exc:
            raise DataError(f"the shard became unreadable while in use: {exc}") from exc
        finally:
            windows.close()

    def close(self) -> None:
        self.reader.close()
        self.masks.close()


def load_seg_splits(sources: Sequence[tuple[SplitReader, Any, Any]], *, patch_size: int,
                    device: torch.device, data: DataConfig | None = None,
                    who: str = "this rank") -> list[SegSplit | StreamedSegSplit]:
    """One :class:`SegSplit` (in memory; masks validated by
    :func:`fedsilo.shards.read_masks`) or :class:`StreamedSegSplit` per ``(reader, mean,
    std)``: all held or all streamed, as ``data`` decides (``loading.plan_loading``;
    without ``data``: held)."""
    if data is not None:
        plan = plan_loading(sources, data=data, who=who,
                            row_bytes=lambda r: r.row_bytes + r.image_shape[1] * r.image_shape[2])
        if not plan.hold:
            streamed: list[SegSplit | StreamedSegSplit] = []
            for reader, mean, std in sources:
                reader.cache_bytes = plan.cache_bytes
                streamed.append(StreamedSegSplit(reader, mean=mean, std=std, device=device,
                                                 window_bytes=plan.window_bytes,
                                                 patch_size=patch_size))
            return streamed
    splits: list[SegSplit | StreamedSegSplit] = []
    for reader, mean, std in sources:
        try:
            images = reader.read(np.arange(reader.num_samples))
            labels = reader.labels()
            masks = read_masks(reader.path, reader.split)
        finally:
            reader.close()
        splits.append(SegSplit(
            torch.from_numpy(np.ascontiguousarray(images)).to(device),
            torch.from_numpy(masks).to(device), torch.from_numpy(labels).to(device),
            channel_stat(mean, device), channel_stat(std, device), patch_size))
    return splits


class SegmentationTask:
    """Segmentation as the roles use it (``tasks.py``)."""

    name = "segmentation"
    dense = True

    def __init__(self, config: SegmentationConfig) -> None:
        self.config = config

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """The input size a model is built and checked for: one patch."""
        return self.config.patch_size, self.config.patch_size

    def load(self, sources: Sequence[tuple[SplitReader, Any, Any]], *, data: DataConfig,
             device: torch.device, who: str) -> list[SegSplit | StreamedSegSplit]:
        return load_seg_splits(sources, patch_size=self.config.patch_size, device=device,
                               data=data, who=who)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_ce_per_sample(logits, target, dice_weight=self.config.dice_weight).mean()

    def sample_loss(self, logits: torch.Tensor, target: torch.Tensor, *,
                    reduction: str = "none") -> torch.Tensor:
        """Each image's loss (DP-SGD clips per image: ``reduction`` must be none)."""
        assert reduction == "none"
        return dice_ce_per_sample(logits, target, dice_weight=self.config.dice_weight)

    def train_transform(self, augmenter: Any, generator: torch.Generator) -> Transform:
        """Patches (and flips/rotations) of a batch, drawn from ``generator``."""
        config = self.config

        def transform(pixels: torch.Tensor, masks: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
            pixels, masks = crop_patches(pixels, masks, size=config.patch_size,
                                         foreground=config.foreground, generator=generator)
            if config.augment:
                pixels, masks = augment_pair(pixels, masks, generator=generator)
            return pixels, masks

        return transform

    def check_output(self, logits: torch.Tensor, num_classes: int) -> str | None:
        if logits.ndim != 4 or logits.shape[1] != num_classes:
            return (f"outputs {tuple(logits.shape)} for one patch; expected (1, {num_classes},"
                    f" H, W) logits")
        return None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: SegSplit | StreamedSegSplit, *, batch_size: int,
                 thresholds: Any = None) -> dict[str, Any]:
        return evaluate_segmentation(model, data, config=self.config, batch_size=batch_size)


@torch.no_grad()
def evaluate_segmentation(model: Callable[[torch.Tensor], torch.Tensor],
                          data: SegSplit | StreamedSegSplit, *,
                          config: SegmentationConfig, batch_size: int = 8,
                          keep: int = 0) -> dict[str, Any]:
    """Sliding-window inference over every whole image of ``data``: loss, pixel accuracy,
    Dice and IoU (per class, and their foreground mean), binary pixel AUC and HD95
    (``scores.py``).  ``keep``: also return the first ``keep`` images' predictions."""
    if isinstance(model, nn.Module):
        model.eval()
    num_classes = None
    counts: np.ndarray | None = None
    loss_sum, distances = 0.0, []
    fg_probs, fg_truth = [], []
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for images, masks in data.batches(in_order(len(data), 1)):
        logits = sliding_window(model, images, size=config.patch_size, overlap=config.overlap,
                                batch_size=batch_size)
        num_classes = logits.shape[1]
        loss_sum += float(dice_ce_per_sample(logits, masks,
                                             dice_weight=config.dice_weight).sum())
        probs = torch.softmax(logits, dim=1)
        pred = probs.argmax(1).cpu().numpy()
        true = masks.cpu().numpy()
        step = scores.confusion(pred, true, num_classes)
        counts = step if counts is None else counts + step
        for c in range(1, num_classes):
            d = scores.hd95(pred[0] == c, true[0] == c)
            if not math.isnan(d):
                distances.append(d)
        if num_classes == 2:
            fg_probs.append(probs[:, 1].cpu().numpy().astype(np.float32).ravel())
            fg_truth.append((true == 1).ravel())
        if len(kept) < keep:
            kept.append((pred[0].astype(np.uint8), probs[0].cpu().numpy()))
    n = len(data)
    if counts is None:
        nan = float("nan")
        return {"loss": nan, "acc": nan, "auc": nan, "dice": nan, "iou": nan, "hd95": nan,
                "num_samples": 0}
    dice, iou = scores.dice_iou(counts)
    result: dict[str, Any] = {
        "loss": loss_sum / n,
        "acc": float(np.trace(counts) / counts.sum()),
        "auc": scores.pixel_auc(np.concatenate(fg_probs), np.concatenate(fg_truth))
        if fg_probs else float("nan"),
        "dice": float(np.nanmean(dice[1:])) if len(dice) > 1 else dice[0],
        "iou": float(np.nanmean(iou[1:])) if len(iou) > 1 else iou[0],
        "hd95": float(np.mean(distances)) if distances else float("nan"),
        "dice_per_class": dice,
        "iou_per_class": iou,
        "num_samples": n,
    }
    if keep:
        result["predictions"] = kept
    return result
