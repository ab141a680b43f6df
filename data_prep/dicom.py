"""Decoding DICOM images into uint8 C x H x W arrays, with pydicom (the only module that
imports it).

Grayscale (MONOCHROME1/2) images go through the standard display pipeline of DICOM
PS3.3 (C.11.1 and C.11.2): stored values -> modality LUT (rescale slope and intercept,
so CT values become Hounsfield units) -> VOI LUT (the window) -> 0..255, inverted for
MONOCHROME1 (where 0 is white).  The window is ``--window C W`` when given, else the
header's WindowCenter/WindowWidth (the first pair when there are several) with its
VOILUTFunction (LINEAR, LINEAR_EXACT or SIGMOID), else the image's own min..max.
A VOI LUT Sequence in the header is not applied.  RGB and YBR images (pydicom converts
YBR to RGB) are scaled from their bit depth; PALETTE COLOR goes through its colour LUT.

Compressed transfer syntaxes are decoded by pydicom's pixel handlers: RLE Lossless and
Deflate always, JPEG baseline/extended (and JPEG 2000 if it has OpenJPEG) through Pillow,
more with the
optional pylibjpeg or GDCM plugins.  A syntax no installed handler reads is a bad
input naming the syntax.  Multi-frame images are refused (one image per file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut

from fedsilo.prep.images import finish, stretch_to_8bit
from fedsilo.prep.records import BadInput

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")


@dataclass(frozen=True)
class DicomDecoder:
    """Decodes one DICOM file; ``window`` = (center, width) overrides the header's."""

    channels: int | None = None
    size: tuple[int, int] | None = None
    window: tuple[float, float] | None = None

    def __call__(self, path: str) -> np.ndarray | BadInput:
        try:
            ds = pydicom.dcmread(path)
        # pydicom reports a damaged or foreign file with many exception types (its own,
        # OSError, EOFError, struct/ValueError...); every one means "cannot read this file"
        except Exception as exc:  # noqa: BLE001
            return BadInput(path, f"not a readable DICOM file: {exc}")
        if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
            return BadInput(path, "DICOM file has no pixel data")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames != 1:
            return BadInput(path, f"multi-frame DICOM ({frames} frames) is not supported: "
                                  f"one image per file")
        try:
            pixels = ds.pixel_array
        # the pixel handlers raise NotImplementedError, RuntimeError, ValueError... for an
        # unsupported syntax or a truncated / corrupt pixel stream
        except Exception as exc:  # noqa: BLE001
            return BadInput(path, f"cannot decode the pixel data ({_syntax(ds)}): {exc}")
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        try:
            if photometric in ("MONOCHROME1", "MONOCHROME2"):
                gray = display_values(pixels, ds, window=self.window)
                if photometric == "MONOCHROME1":
                    gray = 255 - gray
                image = Image.fromarray(gray)
            elif photometric in _COLOUR:
                image = Image.fromarray(_scale_rgb(pixels, int(ds.get("BitsStored", 8))))
            elif photometric == "PALETTE COLOR":
                image = Image.fromarray(_scale_rgb(apply_color_lut(pixels, ds), 16))
            else:
                return BadInput(path, f"unsupported PhotometricInterpretation {photometric!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return BadInput(path, f"cannot map the pixel data to 8 bits: {exc}")
        return finish(image, channels=self.channels, size=self.size)

    def describe(self) -> dict[str, Any]:
        return {"decoder": "pydicom", "channels": self.channels,
                "size": None if self.size is None else list(self.size),
                "window": None if self.window is None else list(self.window)}


def display_values(
    pixels: np.ndarray, ds: Any, *, window: tuple[float, float] | None = None
) -> np.ndarray:
    """Stored grayscale values -> modality LUT -> window -> uint8 (before any inversion)."""
    if pixels.ndim != 2:
        raise ValueError(f"expected one grayscale frame, got pixel array of shape {pixels.shape}")
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if window is None:
        window = header_window(ds)
        if window is None:
            return stretch_to_8bit(values)
    else:
        function = "LINEAR"  # a window given on the command line is the standard linear one
    center, width = window
    return np.clip(np.rint(apply_window(values, center, width, function=function)),
                   0, 255).astype(np.uint8)


def apply_window(values: np.ndarray, center: float, width: float, *,
                 function: str = "LINEAR") -> np.ndarray:
    """A VOI window onto 0..255 (float), as DICOM PS3.3 C.11.2.1.2 defines the functions.

    >>> apply_window(np.array([-1000.0, 40.0, 1000.0]), 40, 400).round(1).tolist()
    [0.0, 127.8, 255.0]
    """
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0) * 255.0
    if width <= 1:  # LINEAR with the smallest width: a threshold
        return np.where(values > center - 0.5, 255.0, 0.0)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0


def header_window(ds: Any) -> tuple[float, float] | None:
    """The header's first (WindowCenter, WindowWidth) pair, or None if absent or unusable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center = center[0] if isinstance(center, MultiValue) else center
    width = width[0] if isinstance(width, MultiValue) else width
    try:
        center, width = float(center), float(width)
    except (TypeError, ValueError):
        return None
    return (center, width) if width > 0 and np.isfinite(center) and np.isfinite(width) else None


def _scale_rgb(pixels: np.ndarray, bits: int) -> np.ndarray:
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected one RGB frame, got pixel array of shape {pixels.shape}")
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    top = float(2 ** max(1, min(bits, 16)) - 1)
    return np.clip(np.rint(pixels.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)


def _syntax(ds: Any) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"transfer syntax {uid.name}" if uid is not None else "unknown transfer syntax"
