"""A synthetic image-classification set with real, learnable class structure.

Every class has its own smooth prototype (a sum of a few random low-frequency plane
waves per channel) on top of a background shared by all classes.  An image blends its
class's prototype with a random other class's, with the own-class weight drawn from
U(0.45, 1), then gets a random shift, contrast, brightness and pixel noise.  About one
image in eleven is therefore closer to another class than to its own (its weight falls
below 0.5), which caps the attainable accuracy near 0.9: a model that learns shows it,
and a model cannot look perfect after one short round.  Generation is vectorized numpy
and deterministic per seed.
"""

from __future__ import annotations

import numpy as np

from fedsilo.errors import DataError
from fedsilo.prep.source import SourceData

#: own-class blend weight range; below 0.5 the image looks more like another class
_MIX_LOW, _MIX_HIGH = 0.45, 1.0
_MAX_SHIFT = 3
_WAVES = 5
_NOISE = 0.12


def make_synthetic(
    *,
    num_samples: int,
    num_classes: int = 2,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    seed: int = 0,
    test_samples: int | None = None,
    val_samples: int | None = None,
) -> SourceData:
    """Generate ``num_samples`` training images (and optional val/test splits).

    >>> src = make_synthetic(num_samples=10, num_classes=3, image_shape=(3, 8, 8), test_samples=4)
    >>> src.splits["train"][0].shape, src.splits["test"][0].shape, src.num_classes
    ((10, 3, 8, 8), (4, 3, 8, 8), 3)
    """
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"image_shape must be (C, H, W) of positive sizes, got {image_shape!r}")
    if num_classes < 2:
        raise DataError(
            f"a synthetic classification set needs at least 2 classes, got {num_classes}"
        )
    if num_samples < 1:
        raise DataError(f"num_samples must be positive, got {num_samples}")
    for label, n in (("test_samples", test_samples), ("val_samples", val_samples)):
        if n is not None and n < 0:
            raise DataError(f"{label} must be non-negative, got {n}")
    # independent streams, so asking for a test split does not change the training images
    proto_seq, train_seq, val_seq, test_seq = np.random.SeedSequence(seed).spawn(4)
    proto_rng = np.random.default_rng(proto_seq)
    background = _smooth_fields(proto_rng, 1, shape)[0]
    prototypes = _smooth_fields(proto_rng, num_classes, shape)

    def draw(seq: np.random.SeedSequence, n: int) -> tuple[np.ndarray, np.ndarray]:
        return _sample(np.random.default_rng(seq), n, prototypes, background)

    splits = {"train": draw(train_seq, num_samples)}
    if val_samples:
        splits["val"] = draw(val_seq, val_samples)
    if test_samples:
        splits["test"] = draw(test_seq, test_samples)
    return SourceData(
        name="synthetic",
        num_classes=num_classes,
        splits=splits,
        provenance={
            "kind": "synthetic",
            "generator": "fedsilo-synthetic-1",
            "seed": int(seed),
            "num_samples": {k: int(len(v[1])) for k, v in splits.items()},
            "num_classes": int(num_classes),
            "image_shape": list(shape),
        },
    )


def _smooth_fields(rng: np.random.Generator, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """``count`` random low-frequency patterns of ``shape``, each scaled to [-1, 1]."""
    channels, height, width = shape
    y = np.arange(height, dtype=np.float64)[:, None] / height
    x = np.arange(width, dtype=np.float64)[None, :] / width
    # 1 to 3 cycles across the image: coarse enough to survive a few pixels of shift
    freq = rng.uniform(1.0, 3.0, size=(count, channels, _WAVES))
    angle = rng.uniform(0, np.pi, size=(count, channels, _WAVES))
    phase = rng.uniform(0, 2 * np.pi, size=(count, channels, _WAVES))
    amp = rng.uniform(0.5, 1.0, size=(count, channels, _WAVES))
    fy = (freq * np.sin(angle))[..., None, None]
    fx = (freq * np.cos(angle))[..., None, None]
    waves = amp[..., None, None] * np.cos(2 * np.pi * (fy * y + fx * x) + phase[..., None, None])
    fields = waves.sum(axis=2)
    fields -= fields.mean(axis=(2, 3), keepdims=True)
    fields /= np.abs(fields).max(axis=(2, 3), keepdims=True) + 1e-12
    return fields.astype(np.float32)


def _sample(
    rng: np.random.Generator, n: int, prototypes: np.ndarray, background: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    num_classes = len(prototypes)
    labels = rng.integers(0, num_classes, size=n)
    others = (labels + rng.integers(1, num_classes, size=n)) % num_classes
    mix = rng.uniform(_MIX_LOW, _MIX_HIGH, size=n).astype(np.float32)[:, None, None, None]
    signal = mix * prototypes[labels] + (1 - mix) * prototypes[others]
    pattern = 0.5 * background[None] + signal
    # a random shift per image; rolling each group of equally-shifted images at once
    # keeps this vectorized without a per-pixel gather
    span = 2 * _MAX_SHIFT + 1
    shift_id = rng.integers(0, span * span, size=n)
    for sid in np.unique(shift_id):
        members = shift_id == sid
        dy, dx = divmod(int(sid), span)
        pattern[members] = np.roll(
            pattern[members], (dy - _MAX_SHIFT, dx - _MAX_SHIFT), axis=(2, 3)
        )
    contrast = rng.uniform(0.15, 0.3, size=(n, 1, 1, 1)).astype(np.float32)
    brightness = rng.normal(0.5, 0.05, size=(n, 1, 1, 1)).astype(np.float32)
    noise = rng.standard_normal(pattern.shape, dtype=np.float32) * _NOISE
    images = np.clip(brightness + contrast * pattern + noise, 0.0, 1.0)
    return (images * 255.0 + 0.5).astype(np.uint8), labels.astype(np.int64)
