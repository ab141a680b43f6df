"""The ``data`` section: the shard set, normalization, memory, augmentation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic.dataclasses import dataclass

from fedsilo.config.schema import SECTION_CONFIG, Bool, Float, Int, Str, bool_words, setting


@dataclass(frozen=True, config=SECTION_CONFIG)
class AugmentConfig:
    """Augmentation of training batches, per sample (torchvision.transforms.v2; docs/
    data-loading.md).  Every default is off."""

    #: RandomResizedCrop back to the image size, of an area in [crop_scale, 1] (1: off)
    crop_scale: Float = setting(1.0, gt=0, le=1)
    #: RandomHorizontalFlip (p = 0.5)
    flip: Bool = False
    #: RandomRotation by up to this many degrees either way (0: off)
    rotation: Float = setting(0.0, ge=0, le=180)
    #: ColorJitter of brightness, contrast and saturation by this factor (RGB shards only)
    color_jitter: Float = setting(0.0, ge=0, le=1)

    @property
    def enabled(self) -> bool:
        return self.crop_scale < 1 or self.flip or self.rotation > 0 or self.color_jitter > 0


@dataclass(frozen=True, config=SECTION_CONFIG)
class DataConfig:
    #: directory of the shard set written by ``fedsilo prep``
    dir: Str = "shards"
    #: pixel normalization: global (manifest statistics, combined from per-site sums),
    #: site (each participant its own statistics; the coordinator uses global), none ([0, 1])
    normalize: Literal["global", "site", "none"] = "global"
    #: verify every shard's sha256 against the manifest before training
    verify_hashes: Bool = True
    #: hold a rank's splits in memory (true), stream them from their shards (false), or
    #: auto: in memory when their raw pixels fit in memory_limit_mb
    in_memory: Annotated[Literal["auto", "true", "false"], bool_words("true", "false")] = "auto"
    #: the memory a rank's data may take (MiB): the auto choice, and for streamed splits
    #: the chunk cache and the windows of batches read ahead
    memory_limit_mb: Int = setting(1024, ge=1)
    augment: AugmentConfig = setting(default_factory=AugmentConfig)
