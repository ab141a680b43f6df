"""Segmentation training pieces (issue 28): patches and augmentation keep image and mask
aligned, sliding windows equal whole-image inference, the scores match hand computations,
the loss is per sample, and DP-SGD's clipping is exact for the U-Net's layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.config import SegmentationConfig
from fedsilo.loading import in_order
from fedsilo.models import build_model
from fedsilo.segmentation import scores
from fedsilo.segmentation.loss import dice_ce_per_sample
from fedsilo.segmentation.task import SegmentationTask, SegSplit, evaluate_segmentation
from fedsilo.segmentation.window import sliding_window


def _split(images: torch.Tensor, masks: torch.Tensor, patch: int) -> SegSplit:
    c = images.shape[1]
    return SegSplit(images, masks, masks.flatten(1).amax(1).long(), torch.zeros(1, c, 1, 1),
                    torch.ones(1, c, 1, 1), patch)


def test_patches_and_augmentation_keep_a_mask_drawn_from_the_image_aligned():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 3, 40, 52), dtype=np.uint8))
    masks = (images[:, 0] > 200).to(torch.uint8)  # the mask is a function of the pixels
    task = SegmentationTask(SegmentationConfig(patch_size=16, foreground=1.0, augment=True))
    transform = task.train_transform(None, torch.Generator().manual_seed(1))
    seen_turns = set()
    for _ in range(20):
        x, m = transform(images, masks)
        assert x.shape == (6, 3, 16, 16) and m.shape == (6, 16, 16)
        torch.testing.assert_close(m, (x[:, 0] > 200).to(torch.uint8), rtol=0, atol=0)
        assert bool((m.flatten(1).amax(1) == 1).all())  # foreground=1: every patch has some
        seen_turns.add(bytes(x[0, 0].numpy()))
    assert len(seen_turns) > 10
    # the same generator seed draws the same patches (resume stays bit-identical)
    a = task.train_transform(None, torch.Generator().manual_seed(7))(images, masks)
    b = task.train_transform(None, torch.Generator().manual_seed(7))(images, masks)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_an_empty_batch_gives_empty_patches():
    """DP-SGD's Poisson sampling may draw no image: the step then adds noise only."""
    task = SegmentationTask(SegmentationConfig(patch_size=16))
    x, m = task.train_transform(None, torch.Generator().manual_seed(0))(
        torch.zeros(0, 3, 20, 20, dtype=torch.uint8), torch.zeros(0, 20, 20, dtype=torch.uint8))
    assert x.shape == (0, 3, 16, 16) and m.shape == (0, 16, 16)


def test_images_smaller_than_a_patch_are_padded_with_background():
    task = SegmentationTask(SegmentationConfig(patch_size=16, augment=False))
    x, m = task.train_transform(None, torch.Generator().manual_seed(0))(
        torch.full((1, 1, 10, 12), 9, dtype=torch.uint8), torch.ones(1, 10, 12, dtype=torch.uint8))
    assert x.shape == (1, 1, 16, 16) and int(m.sum()) == 120 and int(x.sum()) == 9 * 120


def test_sliding_window_equals_whole_image_inference_where_both_fit():
    torch.manual_seed(0)
    model = build_model("basic_unet", in_channels=3, num_classes=2, image_size=(32, 32)).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = model(image)
    torch.testing.assert_close(sliding_window(model, image, size=32, overlap=0.5), whole)
    # a pointwise model gives every window the same logits at a pixel: the average of
    # overlapping windows is the whole-image result at any size
    pointwise = nn.Conv2d(3, 4, 1)
    big = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window(pointwise, big, size=16, overlap=0.25,
                                                  batch_size=3), pointwise(big))


def test_scores_match_a_hand_computation():
    true = np.zeros((6, 6), np.uint8)
    true[1:4, 1:4] = 1  # 9 pixels
    pred = np.zeros((6, 6), np.uint8)
    pred[1:4, 2:5] = 1  # 9 pixels, 6 of them shared
    dice, iou = scores.dice_iou(scores.confusion(pred, true, 2))
    assert dice[1] == pytest.approx(2 * 6 / 18) and iou[1] == pytest.approx(6 / 12)
    assert dice[0] == pytest.approx(2 * 24 / (27 + 27)) and iou[0] == pytest.approx(24 / 30)
    # boundaries: the 8 ring pixels of each 3x3 square; shifted by one column, 4 of each
    # ring lie on the other ring (distance 0) and 4 one pixel from it
    a, b = true.astype(bool), pred.astype(bool)
    d = np.concatenate([_nearest(scores.boundary(a), scores.boundary(b)),
                        _nearest(scores.boundary(b), scores.boundary(a))])
    assert sorted(d.tolist()) == [0.0] * 8 + [1.0] * 8
    assert scores.hd95(b, a) == pytest.approx(np.percentile(d, 95)) == pytest.approx(1.0)
    far = np.zeros((6, 6), bool)
    far[5, 5] = True
    assert scores.hd95(far, a) == pytest.approx(np.percentile(
        np.concatenate([_nearest(far, scores.boundary(a)), _nearest(scores.boundary(a), far)]),
        95))
    assert math.isnan(scores.hd95(np.zeros((3, 3), bool), a[:3, :3]))
    assert scores.pixel_auc(np.array([0.2, 0.9, 0.9, 0.1]), np.array([0, 1, 0, 0], bool)) \
        == pytest.approx((2 + 0.5) / 3)


def _nearest(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Brute force: from each True pixel of ``points`` to the nearest of ``targets``."""
    tp = np.argwhere(targets)
    return np.array([np.sqrt(((tp - p) ** 2).sum(1)).min() for p in np.argwhere(points)])


def test_the_loss_is_a_mean_of_per_sample_losses():
    torch.manual_seed(1)
    logits, target = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 8, 8))
    each = torch.stack([dice_ce_per_sample(logits[i: i + 1], target[i: i + 1])[0]
                        for i in range(4)])
    torch.testing.assert_close(dice_ce_per_sample(logits, target), each)
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert float(dice_ce_per_sample(perfect, target).max()) < 1e-3


def test_evaluation_of_a_perfect_model_scores_one():
    masks = torch.zeros(2, 30, 40, dtype=torch.uint8)
    masks[0, 5:20, 10:30] = 1
    masks[1, 2:6, 3:33] = 1
    images = masks[:, None].repeat(1, 3, 1, 1) * 255

    def oracle(x: torch.Tensor) -> torch.Tensor:  # logits from the pixels themselves
        fg = (x[:, :1] > 0.5).float() * 40 - 20
        return torch.cat([-fg, fg], 1)

    split = _split(images, masks, 16)
    split = SegSplit(split.images, split.masks, split.labels, split.mean,
                     torch.full((1, 3, 1, 1), 255.0 / 255.0), 16)
    result = evaluate_segmentation(oracle, split, config=SegmentationConfig(patch_size=16))
    assert result["dice"] == pytest.approx(1.0) and result["iou"] == pytest.approx(1.0)
    assert result["auc"] == pytest.approx(1.0) and result["hd95"] == 0.0
    assert result["acc"] == 1.0 and result["num_samples"] == 2


def test_the_residual_unet_is_named_by_the_dp_validator():
    from fedsilo.privacy.validate import static_problems

    model = build_model("unet", in_channels=1, num_classes=2, image_size=(16, 16))
    assert any("ConvTranspose2d" in p for p in static_problems(model))
    assert static_problems(build_model("basic_unet", in_channels=1, num_classes=2,
                                       image_size=(16, 16))) == []


@pytest.mark.parametrize("mode", ["mixed", "hooks"])
def test_dp_engine_clips_segmentation_per_image_exactly(mode):
    """DP clipping is exact for the U-Net's layers: the DP-SGD engine with segmentation's
    per-image loss, by mixed ghost clipping and by Opacus's hooks, gives the sum of
    explicitly computed, clipped per-image gradients (as test_privacy does for the
    classifiers)."""
    from fedsilo.config import load_config
    from fedsilo.privacy.engine import ParticipantPrivacy

    config = load_config(None, overrides=["dp.enabled=true", "dp.noise_multiplier=1.0",
                                          "dp.max_grad_norm=0.05", "task=segmentation",
                                          "train.batch_size=2"])
    task = SegmentationTask(config.segmentation)
    torch.manual_seed(5)
    model = build_model("basic_unet", in_channels=1, num_classes=2, image_size=(16, 16))
    images, masks = torch.randn(3, 1, 16, 16), torch.randint(0, 2, (3, 16, 16))
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    for i in range(3):
        loss = task.sample_loss(model(images[i: i + 1]), masks[i: i + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        for e, g in zip(expected, grads):
            e += g * min(1.0, 0.05 / (norm + 1e-6))
    privacy = ParticipantPrivacy(model, site=0, settings=config.dp.for_site(0), mechanism="rdp",
                                 num_samples=6, train=config.train, rounds=1,
                                 model_name="basic_unet", sample=images[:2], mode=mode,
                                 sample_loss=task.sample_loss, dense=True, lookahead=0)
    assert privacy.mode == mode
    from fedsilo.privacy.ghost import supports

    assert supports(model)
    for p in params:
        p.grad = None
    privacy.clipped_sum(images, masks)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


def _seg_shard(path, images: np.ndarray, masks: np.ndarray) -> None:
    from fedsilo.shards import ShardWriter

    with ShardWriter(path, kind="test", image_shape=images.shape[1:], num_classes=3,
                     masks=True) as writer:
        writer.append("test", images, masks.reshape(len(masks), -1).max(1).astype(np.int64),
                      masks=masks)


def test_a_streamed_split_gives_the_batches_of_one_held_in_memory(tmp_path):
    """Streaming (data.in_memory=false) reads windows of whole images and label maps and
    cuts the same patches from them, drawing from the same generator: bit for bit the
    batches of the split held in memory, whatever the batch order (repeats included)."""
    from fedsilo.config import DataConfig
    from fedsilo.segmentation.task import StreamedSegSplit, load_seg_splits
    from fedsilo.shards import SplitReader

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (7, 2, 40, 33), dtype=np.uint8)
    masks = rng.integers(0, 3, (7, 40, 33), dtype=np.uint8)
    _seg_shard(tmp_path / "t.h5", images, masks)
    task = SegmentationTask(SegmentationConfig(patch_size=16, foreground=0.5, augment=True))
    order = [np.array([4, 0, 4]), np.array([6]), np.array([1, 2, 3, 5]), np.array([], int)]
    out = {}
    for mode in ("true", "false"):
        data = DataConfig(in_memory=mode, memory_limit_mb=1)  # type: ignore[arg-type]
        split = load_seg_splits([(SplitReader(tmp_path / "t.h5", "test", cache_bytes=0),
                                  [0.5, 0.4], [0.2, 0.3])], patch_size=16, device=torch.device(
                                      "cpu"), data=data, who="test")[0]
        assert isinstance(split, StreamedSegSplit) == (mode == "false")
        if isinstance(split, StreamedSegSplit):
            split.window_rows = 2  # several windows, one batch split across two
        transform = task.train_transform(None, torch.Generator().manual_seed(5))
        out[mode] = (list(split.batches(order, transform=transform)),
                     list(split.batches(in_order(7, 3))), split.sample(2), split.labels)
    held, streamed = out["true"], out["false"]
    for a, b in zip(held[0] + held[1], streamed[0] + streamed[1], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert held[0][0][0].shape == (3, 2, 16, 16) and held[1][0][1].shape == (3, 40, 33)
    assert torch.equal(held[1][2][1], torch.from_numpy(masks[6:7]).long())
    assert torch.equal(held[2], streamed[2]) and torch.equal(held[3], streamed[3])


def test_a_streamed_mask_with_an_unknown_class_is_a_data_error(tmp_path):
    import h5py

    from fedsilo.config import DataConfig
    from fedsilo.errors import DataError
    from fedsilo.segmentation.task import load_seg_splits
    from fedsilo.shards import SplitReader

    images = np.zeros((3, 1, 8, 8), np.uint8)
    _seg_shard(tmp_path / "t.h5", images, np.zeros((3, 8, 8), np.uint8))
    with h5py.File(tmp_path / "t.h5", "r+") as f:
        f["test/masks"][2, 3, 3] = 9
    split = load_seg_splits([(SplitReader(tmp_path / "t.h5", "test", cache_bytes=0), [0.5],
                              [0.2])], patch_size=8, device=torch.device("cpu"),
                            data=DataConfig(in_memory="false"), who="test")[0]
    assert len(list(split.batches([np.array([0, 1])]))) == 1
    with pytest.raises(DataError, match=r"t.h5 \[test\]: label value 9 is outside \[0, 3\)"):
        list(split.batches([np.array([2])]))
