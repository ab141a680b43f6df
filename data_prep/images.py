"""Decoding image files (PNG, JPEG, BMP, TIFF) into uint8 C x H x W arrays, with Pillow.

Every decoder returns either the array or a :class:`BadInput` saying why the file
cannot be used; it never raises for a bad file, so a worker process can hand the
verdict back and the pipeline decides whether to stop or skip.

Pixel mapping to 8 bits:

* 8-bit grayscale and RGB are kept as they are; 1-bit becomes 0/255;
* 16-bit (and 32-bit integer) grayscale maps 0..65535 linearly onto 0..255;
* floating-point grayscale is stretched from its own minimum..maximum;
* palette, RGBA, CMYK and other colour modes are converted to RGB (alpha dropped).

Then, in this order: the EXIF orientation is applied (as viewers show the image),
channels are converted if asked (RGB to grayscale with ITU-R 601-2 luma, grayscale to
RGB by replication), and the image is resized if asked, with Pillow's antialiased
bilinear filter (torchvision's ``Resize`` default), without keeping the aspect ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from fedsilo.prep.records import BadInput

#: Pillow's errors for files it cannot identify, parse or fully read (truncated)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageDecoder:
    """Decodes one image file; ``channels`` (1 or 3) and ``size`` (H, W) are optional."""

    channels: int | None = None
    size: tuple[int, int] | None = None

    def __call__(self, path: str) -> np.ndarray | BadInput:
        try:
            with Image.open(path) as opened:
                opened.load()
                image = to_8bit(opened)
                ImageOps.exif_transpose(image, in_place=True)
        except _PIL_ERRORS as exc:
            return BadInput(path, f"unreadable image: {exc}")
        return finish(image, channels=self.channels, size=self.size)

    def describe(self) -> dict[str, Any]:
        return {"decoder": "pillow", "channels": self.channels,
                "size": None if self.size is None else list(self.size)}


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit ``L`` (grayscale) or ``RGB`` image (a new one where needed)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image.copy()  # detached from the file, and keeps its EXIF for exif_transpose
    if mode == "1":
        return image.convert("L")
    if mode in ("LA", "La"):
        return image.getchannel(0)
    if mode == "I" or mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.float64)
        return _with_info(Image.fromarray(_rint8(np.clip(wide, 0, 65535) / 257.0)), image)
    if mode == "F":
        return _with_info(Image.fromarray(stretch_to_8bit(np.asarray(image, np.float64))), image)
    return image.convert("RGB")


def stretch_to_8bit(values: np.ndarray) -> np.ndarray:
    """Map ``values`` linearly from their own [min, max] onto 0..255 (all 0 if constant)."""
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("pixel values are empty or not finite")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return _rint8((values - low) / (high - low) * 255.0)


def finish(image: Image.Image, *, channels: int | None, size: tuple[int, int] | None) -> np.ndarray:
    """An 8-bit L/RGB image as a uint8 C x H x W array, channel-converted and resized."""
    if channels == 1 and image.mode == "RGB":
        image = image.convert("L")
    elif channels == 3 and image.mode == "L":
        image = image.convert("RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return np.ascontiguousarray(array[None])
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _rint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _with_info(converted: Image.Image, original: Image.Image) -> Image.Image:
    converted.info.update(original.info)  # keeps the EXIF orientation
    return converted


def decode_mask(path: str) -> np.ndarray | BadInput:
    """A mask file as a uint8 H x W label map, or why it cannot be one.

    1-bit images become 0/1; 8-bit grayscale and palette images keep their values (a label
    map; a palette image's values are its palette indexes); 16-bit grayscale keeps values
    up to 255.  Colour masks are accepted only when their three channels are equal.  No
    EXIF rotation and no resizing: a label map must stay pixel-aligned with its image.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            mode = opened.mode
            array = np.asarray(opened)
    except _PIL_ERRORS as exc:
        return BadInput(path, f"unreadable mask: {exc}")
    if mode == "1":
        return array.astype(np.uint8)
    if array.ndim == 3:
        if array.shape[2] >= 3 and (np.array_equal(array[..., 0], array[..., 1])
                                     and np.array_equal(array[..., 0], array[..., 2])):
            array = array[..., 0]
        else:
            return BadInput(path, f"a colour mask ({mode}) is not a label map; save it as "
                            f"1-bit, grayscale or palette PNG")
    if array.ndim != 2 or array.dtype.kind not in "ui":
        return BadInput(path, f"mask mode {mode} is not a label map")
    if array.size and (int(array.min()) < 0 or int(array.max()) > 255):
        return BadInput(path, f"mask values reach {int(array.max())}, beyond 255")
    return np.ascontiguousarray(array.astype(np.uint8))


def write_png(path: str, array: np.ndarray) -> None:
    """Write a uint8 H x W (grayscale) or H x W x 3 (RGB) array as a PNG file."""
    Image.fromarray(np.ascontiguousarray(array.astype(np.uint8))).save(path, format="PNG")
